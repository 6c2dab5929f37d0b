"""Node agent, ours vs Istio's own ``install-cni``, taking turns on one testbed (issue 18):
enrolment after a namespace label, memory idle / at N pods, restart to ready.

``python -m bench.vs_istio_agent [--pods 200] [--rss-pods 1000] [--order ours,istio,istio,ours]``
as root. Each turn is one agent on a fresh light node (:mod:`bench.agent_light_pods`) of its
own on the same testbed API server, the same ``pods`` running light pods in an unlabelled
namespace, a recording ZDS peer as ztunnel (acks at once: the agent is measured, not a
proxy), and both agents in the testbed node's network namespace talking to the API server
directly. Ours: ``istio-cni-agent run`` (iptables backend, host-probe rules in a throwaway
namespace). Istio's: ``install-cni`` as its DaemonSet runs it (:mod:`bench.istio_agent`).
Per turn:
- ready: start -> the ZDS snapshot sent; RSS idle then (VmRSS of the agent's pid);
- enrolment: namespace label patch -> every pod seen annotated ``enabled`` on a watch;
  pods/s, and the agent's CPU per pod (own, and reaped children: iptables-restore, ipset);
- RSS after those pods, then (``--rss-pods``) after more pods to that total;
- restart: SIGTERM -> a new agent process's ZDS snapshot sent with every pod in it (adopted,
  not re-enrolled: every pod still annotated, the snapshot's Adds equal the pods).
The order alternates (ABBA by default) so drift hits both. The bench runs in a pid namespace
of its own (it re-executes itself under ``unshare -p --fork --mount-proc``): Istio's agent
reads ``/proc/1/ns/net`` at start, which this machine forbids for its real pid 1.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.agent_enroll import _rss_mb, label_and_measure, start_agent
from bench.agent_light_pods import LightNode, wait_until
from bench.chart import Bar, draw
from bench.istio_agent import start_istio_agent
from bench.istio_peer import DEFAULT_VERSION, PeerBuildError, ensure_peer
from bench.vs_istio_plugin import cni_env, cni_stdin
from cni_plugin.netns import run_in_netns
from tests.zds_recorder import ZdsRecorder

Launcher = Callable[[], "subprocess.Popen[bytes]"]
ROOT = Path(__file__).resolve().parents[1]
Job = tuple[list[str], dict[str, str], bytes]


def spawn_all(jobs: list[Job], stderr: Path) -> list[tuple[float, int]]:
    """Spawn every job at once (as a runtime creating sandboxes together does); (wall ms from
    its spawn to its exit, exit status) each, exits seen through pidfds (no stray reaping);
    their stderr appended to ``stderr``."""
    started: list[tuple[int, int, float]] = []
    try:
        for argv, env, stdin in jobs:
            r, w = os.pipe()
            devnull = os.open(os.devnull, os.O_WRONLY)
            t0 = time.perf_counter()
            try:
                pid = os.posix_spawn(
                    argv[0], argv, env,
                    file_actions=[(os.POSIX_SPAWN_DUP2, r, 0), (os.POSIX_SPAWN_DUP2, devnull, 1),
                              (os.POSIX_SPAWN_OPEN, 2, str(stderr),
                               os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)],
                )  # fmt: skip
            finally:
                os.close(r)
                os.close(devnull)
            os.write(w, stdin)
            os.close(w)
            started.append((pid, os.pidfd_open(pid), t0))
        out: dict[int, tuple[float, int]] = {}
        poller = select.poll()
        for _pid, fd, _t in started:
            poller.register(fd, select.POLLIN)
        by_fd = {fd: (pid, t0) for pid, fd, t0 in started}
        while len(out) < len(started):
            for fd, _ev in poller.poll():
                pid, t0 = by_fd[fd]
                end = time.perf_counter()
                _, status = os.waitpid(pid, 0)
                out[pid] = ((end - t0) * 1000, os.waitstatus_to_exitcode(status))
                poller.unregister(fd)
        return [out[pid] for pid, _fd, _t in started]
    finally:
        for _pid, fd, _t in started:
            os.close(fd)


def installed_config(conf_dir: Path, run_dir: Path, netns: str, ip: str) -> bytes:
    """The stdin a runtime gives the plugin: the ``istio-cni`` entry Istio's installer wrote
    into the chained conflist (its selectors, exclusions, log level...), with the agent dir as
    seen from this host and the pod's prevResult."""
    (conflist,) = sorted(conf_dir.glob("*.conflist"))
    doc = json.loads(conflist.read_text())
    (entry,) = [p for p in doc["plugins"] if p.get("type") == "istio-cni"]
    base = json.loads(cni_stdin(run_dir, netns, ip))
    return json.dumps({**entry, "cniVersion": doc["cniVersion"], "name": doc["name"],
                       "cni_agent_run_dir": str(run_dir),
                       "prevResult": base["prevResult"]}).encode()  # fmt: skip


def ambient_adds(
    ln: LightNode, ns: str, plugin: str, scratch: Path, node_netns: str, pods: int,
    istio: bool, levels: tuple[int, ...] = (1, 20),
) -> dict[str, Any]:  # fmt: skip
    """Plugin ADD of new pods in the labelled namespace, ``levels`` sandboxes at once: spawn ->
    exit of the plugin (the agent judged, rules in, ZDS acked, annotated) per pod. Istio's
    plugin gets the config its installer wrote; ours the chart-default one (it asks the agent
    to judge, so it carries no selectors)."""
    run_dir = scratch / "run"
    if istio:  # its installer re-chains itself after a restart; the runtime waits for that too
        wait_until(
            lambda: "istio-cni" in "".join(p.read_text() for p in (scratch / "net.d").glob("*")),
            60, "Istio's CNI config installed",
        )  # fmt: skip
    res: dict[str, Any] = {}
    for conc in levels:
        lat: list[float] = []
        failures = 0
        made = []
        for b in range(max(1, pods // conc)):
            batch = [ln.add_pod(ns, f"add{conc}-{b}-{j}", running=False) for j in range(conc)]
            made += batch
            jobs: list[Job] = [
                ([plugin], cni_env("/var/run/netns/" + Path(p.netns).name, ns, p.name, p.uid),
                 installed_config(scratch / "net.d", run_dir, p.netns, p.ip) if istio
                 else cni_stdin(run_dir, p.netns, p.ip))
                for p in batch
            ]  # fmt: skip
            spawn = functools.partial(spawn_all, jobs, scratch / "plugin-stderr.log")
            for wall, rc in run_in_netns(node_netns, spawn):
                if rc == 0:
                    lat.append(wall)
                else:
                    failures += 1
        names = {p.uid for p in made}
        annotated = sum(1 for u, v in ln.annotations(ns).items() if u in names and v == "enabled")
        s = sorted(lat) or [float("nan")]
        res[str(conc)] = {
            "pods": len(made),
            "failures": failures,
            "annotated": annotated,
            "median_ms": round(statistics.median(s), 2),
            "p99_ms": round(s[min(len(s) - 1, int(len(s) * 0.99))], 2),
        }
        if failures:
            res[str(conc)]["stderr_tail"] = (scratch / "plugin-stderr.log").read_text()[-600:]
    return res


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _snapshot_of(rec: ZdsRecorder, conn: int) -> bool:
    return any(s.connection == conn for s in rec.of("snapshot_sent"))


def turn(
    kind: str, core: Any, info: dict[str, Any], peer: Any, pods: int, rss_pods: int,
    add_pods: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """One agent's whole turn on a fresh light node; everything made here is removed."""
    ln = LightNode(core)
    tmp = Path(f"/var/tmp/icnia-vsagent-{ln.tag}")
    tmp.mkdir(parents=True)
    probe_ns = f"icnia-vsprobe-{ln.tag}"
    subprocess.run(["ip", "netns", "add", probe_ns], check=True)
    kube_node = str(info["kubeconfig_node"])

    def launch() -> subprocess.Popen[bytes]:
        if kind == "istio":
            return start_istio_agent(
                tmp, peer, node_name=ln.node_name, netns=info["node_netns"],
                kubeconfig_in_node=Path(kube_node),
            )  # fmt: skip
        return start_agent(
            tmp, ln.node_name, kube_node, probe_ns, 16, "iptables", "", netns=info["node_netns"]
        )

    rec = ZdsRecorder(str(tmp / "zt" / "ztunnel.sock"))
    agent: subprocess.Popen[bytes] | None = None
    out: dict[str, Any] = {"agent": kind, "load_at_start": round(os.getloadavg()[0], 2)}
    try:
        ln.create_node()
        ns = f"icnia-vsagent-{ln.tag}"
        ln.create_namespace(ns)
        for i in range(pods):
            ln.add_pod(ns, f"p{i}")
        t0 = time.monotonic()
        agent = launch()
        rec.start()
        wait_until(lambda: _snapshot_of(rec, 1) or agent.poll() is not None, 120, "ready")
        if agent.poll() is not None:
            raise RuntimeError(f"{kind} agent exited {agent.returncode} (log in {tmp})")
        out["ready_s"] = round(time.monotonic() - t0, 2)
        time.sleep(1.0)  # settle after start-up before the idle figure
        out["rss_idle_mb"] = round(_rss_mb(agent.pid), 1)
        run = label_and_measure(core, ln, ns, agent.pid, pods, 600)
        out["enrol_all_s"] = round(run.total_s, 3)
        out["pods_per_s"] = round(pods / run.total_s, 1)
        out["cpu_ms_per_pod"] = {
            "own": round(run.cpu_ms_per_pod(0), 2),
            "children": round(run.cpu_ms_per_pod(1), 2),
        }
        time.sleep(1.0)
        out[f"rss_{pods}_mb"] = round(_rss_mb(agent.pid), 1)
        # Restart: SIGTERM -> a new process has sent a snapshot holding every pod.
        conns = rec.connections
        t_term = time.monotonic()
        _stop(agent)
        agent = launch()
        wait_until(
            lambda: _snapshot_of(rec, conns + 1) or agent.poll() is not None, 300, "re-ready"
        )
        out["restart_to_ready_s"] = round(time.monotonic() - t_term, 2)
        readded = {s.uid for s in rec.of("add") if s.connection == conns + 1}
        out["restart_snapshot_pods"] = len(readded)
        annotations = ln.annotations(ns)
        out["annotated_after_restart"] = sum(1 for v in annotations.values() if v == "enabled")
        if add_pods:
            plugin = (
                str(peer.path("istio-cni")) if kind == "istio" else str(ROOT / "build/istio-cni")
            )
            out["ambient_add"] = ambient_adds(
                ln, ns, plugin, tmp, info["node_netns"], add_pods, kind == "istio"
            )
        if rss_pods > pods:
            for i in range(pods, rss_pods):
                ln.add_pod(ns, f"p{i}")
            wait_until(
                lambda: sum(1 for v in ln.annotations(ns).values() if v == "enabled") >= rss_pods,
                900, f"{rss_pods} pods enabled", step=1.0,
            )  # fmt: skip
            time.sleep(2.0)
            out[f"rss_{rss_pods}_mb"] = round(_rss_mb(agent.pid), 1)
    finally:
        if agent is not None:
            _stop(agent)
        rec.stop()
        out["cleanup_problems"] = ln.cleanup()
        subprocess.run(["ip", "netns", "del", probe_ns], capture_output=True)
        if out["cleanup_problems"] or "restart_to_ready_s" not in out:
            print(f"{kind}: logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out), flush=True)
    return out


def _med(turns: list[dict[str, Any]], kind: str, key: str) -> float:
    return statistics.median(float(t[key]) for t in turns if t["agent"] == kind)


def report(res: dict[str, Any], chart_dir: Path | None) -> str:
    turns, pods, rss_pods = res["turns"], res["pods"], res["rss_pods"]
    rows = [
        ("enrolment: label -> all annotated, pods/s", "pods_per_s", "higher"),
        ("enrolment: label -> all annotated, s", "enrol_all_s", "lower"),
        ("ready after start, s", "ready_s", "lower"),
        ("RSS idle, MB", "rss_idle_mb", "lower"),
        (f"RSS at {pods} pods, MB", f"rss_{pods}_mb", "lower"),
        ("restart to ready (SIGTERM -> snapshot of every pod), s", "restart_to_ready_s", "lower"),
    ]
    if rss_pods > pods:
        rows.insert(5, (f"RSS at {rss_pods} pods, MB", f"rss_{rss_pods}_mb", "lower"))
    lines = [
        f"| agent, {pods} light pods (median of {len(turns) // 2} turns each) | ours | Istio's "
        "| ours / Istio's |",
        "|---|---:|---:|---:|",
    ]
    for label, key, better in rows:
        o, i = _med(turns, "ours", key), _med(turns, "istio", key)
        lines.append(f"| {label} ({better} is better) | {o:g} | {i:g} | **{o / i:.2f}x** |")
    adds = [t for t in turns if "ambient_add" in t]
    for conc in sorted({c for t in adds for c in t["ambient_add"]}, key=int):
        for stat in ("median_ms", "p99_ms"):
            o = statistics.median(
                t["ambient_add"][conc][stat] for t in adds if t["agent"] == "ours"
            )
            i = statistics.median(
                t["ambient_add"][conc][stat] for t in adds if t["agent"] == "istio"
            )
            lines.append(
                f"| ambient ADD end to end, {conc} at once, {stat[:-3]} ms (lower is better) "
                f"| {o:g} | {i:g} | **{o / i:.2f}x** |"
            )
    for part in ("own", "children"):
        o = statistics.median(t["cpu_ms_per_pod"][part] for t in turns if t["agent"] == "ours")
        i = statistics.median(t["cpu_ms_per_pod"][part] for t in turns if t["agent"] == "istio")
        ratio = f"{o / i:.2f}x" if i else "-"
        lines.append(f"| agent CPU per pod, {part}, ms | {o:g} | {i:g} | {ratio} |")
    if chart_dir is not None:
        order = ",".join(t["agent"] for t in turns)
        note = (
            f"istio.io/istio {res['istio_version']}; {pods} light pods; turns {order}; "
            f"load at start {res['load_at_start'][0]}"
        )
        mem = [("idle", "rss_idle_mb"), (f"{pods} pods", f"rss_{pods}_mb")]
        if rss_pods > pods:
            mem.append((f"{rss_pods} pods", f"rss_{rss_pods}_mb"))
        bars = []
        for label, key in mem:
            i = _med(turns, "istio", key)
            o = _med(turns, "ours", key)
            bars += [Bar(f"Istio's, {label}", i, i, True, 1.0),
                     Bar(f"ours, {label}", o, o, False, o / i)]  # fmt: skip
        draw(chart_dir / "vs-istio-agent-rss.png", "Node agent resident memory (VmRSS)",
             "MB (lower is better)", bars, note=note)  # fmt: skip
        bars = []
        for label, key in (("label -> all enrolled", "enrol_all_s"),
                           ("restart -> every pod adopted", "restart_to_ready_s")):  # fmt: skip
            i = _med(turns, "istio", key)
            o = _med(turns, "ours", key)
            bars += [Bar(f"Istio's, {label}", i, i, True, 1.0),
                     Bar(f"ours, {label}", o, o, False, o / i)]  # fmt: skip
        draw(chart_dir / "vs-istio-agent-time.png", f"Node agent, {pods} running pods",
             "seconds (lower is better)", bars, note=note)  # fmt: skip
        if adds:
            bars = []
            for conc in sorted({c for t in adds for c in t["ambient_add"]}, key=int):
                vals = {}
                for who in ("istio", "ours"):
                    ts = [t["ambient_add"][conc] for t in adds if t["agent"] == who]
                    vals[who] = (statistics.median(x["median_ms"] for x in ts),
                                 statistics.median(x["p99_ms"] for x in ts))  # fmt: skip
                bars += [
                    Bar(f"Istio's, {conc} at once", *vals["istio"], True, 1.0),
                    Bar(f"ours, {conc} at once", *vals["ours"], False,
                        vals["ours"][0] / vals["istio"][0]),
                ]  # fmt: skip
            draw(chart_dir / "vs-istio-ambient-add.png",
                 "Ambient pod ADD end to end (plugin spawn -> exit), median, whisker p99",
                 "ms per pod (lower is better)", bars, note=note)  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--pods", type=int, default=200)
    p.add_argument("--rss-pods", type=int, default=0, help="also RSS at this many pods")
    p.add_argument("--add-pods", type=int, default=0, help="ambient ADDs per concurrency")
    p.add_argument("--order", default="ours,istio,istio,ours")
    p.add_argument("--istio-version", default=DEFAULT_VERSION)
    p.add_argument("--instance", default="vsistio", help="testbed instance to use or bring up")
    p.add_argument("--chart-dir", type=Path)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.vs_istio_agent: run as root", file=sys.stderr)
        return 2
    from testbed.layout import Layout
    from testbed.node import Testbed

    bed = Testbed(Layout.for_instance(args.instance))
    if os.getpid() != 1:
        # Out here: build, bring the testbed up (its daemons must be visible to its own
        # bookkeeping), then run the turns in a pid namespace of our own (module docstring).
        brought_up = not bed.status().get("running")
        try:
            ensure_peer(args.istio_version)
            if brought_up:
                bed.up()
            cmd = ["unshare", "-p", "--fork", "--mount-proc", sys.executable, "-m", __spec__.name]
            argv_in = argv if argv is not None else sys.argv[1:]
            return subprocess.run([*cmd, *argv_in]).returncode
        except PeerBuildError as e:
            print(f"bench.vs_istio_agent: {e}", file=sys.stderr)
            return 1
        finally:
            if brought_up:
                bed.down()
    from kubernetes import client

    peer = ensure_peer(args.istio_version)
    info = bed.info()
    core = client.CoreV1Api(bed.kube_client())
    load = os.getloadavg()
    order = [k.strip() for k in args.order.split(",")]
    turns = [turn(k, core, info, peer, args.pods, args.rss_pods, args.add_pods) for k in order]
    res = {
        "istio_version": peer.version,
        "kubernetes": info.get("kubernetes_version"),
        "pods": args.pods,
        "rss_pods": args.rss_pods,
        "load_at_start": [round(x, 2) for x in load],
        "turns": turns,
    }
    print(f"\nistio.io/istio {res['istio_version']}; kubernetes {res['kubernetes']}; load "
          f"average at start {res['load_at_start']}\n")  # fmt: skip
    print(report(res, args.chart_dir))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
