"""Agent bench: label a namespace holding N running pods -> all enrolled; agent RSS at M pods.

Against the real testbed API server (reused when up, else brought up and down here), with
light pods (see :mod:`bench.agent_light_pods`: netns + process in a ``pod<uid>`` cgroup +
Pod object with status Running) on a Node object of their own, so the agent does exactly
what it does for kubelet pods: watch, /proc discovery, rules in the pod netns (real iptables
backend), ZDS Add with the netns fd, probe ipset, ``pods/status`` patch. ztunnel is a
recording ZDS peer that acks at once (the bench measures the agent, not a proxy). The agent
runs as its own process (``istio-cni-agent run``) so its RSS is its own; its host-probe
rules go into a throwaway "node" namespace.

Timing: per pod, from the namespace label patch to the first watch event showing the pod
annotated ``enabled`` (so it includes the API round trips), plus the agent's own per-pod
enrolment time (from its state file). ``python -m bench.agent_enroll --pods 200 --rss-pods 1000``
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.agent_light_pods import LightNode, wait_until
from tests.zds_recorder import ZdsRecorder

AMBIENT = {"istio.io/dataplane-mode": "ambient"}


def _core(kubeconfig: str) -> Any:
    from kubernetes import client
    from kubernetes import config as kube_config

    loader: Any = kube_config
    cfg = client.Configuration()
    loader.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    return client.CoreV1Api(client.ApiClient(cfg))


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _cpu_s(pid: int) -> tuple[float, float]:
    """(own, reaped children) CPU seconds of ``pid`` (utime+stime, cutime+cstime)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    f = text[text.rindex(")") + 2 :].split()
    tick = os.sysconf("SC_CLK_TCK")
    return (int(f[11]) + int(f[12])) / tick, (int(f[13]) + int(f[14])) / tick


def _pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


class EnabledWatch:
    """Records when each pod of a namespace is first seen annotated ``enabled``."""

    def __init__(self, core: Any, namespace: str) -> None:
        self.core, self.namespace = core, namespace
        self.seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        from kubernetes import watch

        watch_mod: Any = watch
        while not self._stop.is_set():
            w = watch_mod.Watch()
            for ev in w.stream(self.core.list_namespaced_pod, self.namespace, timeout_seconds=5):
                meta = ev["object"].metadata
                if (meta.annotations or {}).get("ambient.istio.io/redirection") == "enabled":
                    self.seen.setdefault(meta.uid, time.monotonic())
                if self._stop.is_set():
                    w.stop()
                    break

    def stop(self) -> None:
        self._stop.set()


@dataclass(frozen=True)
class LabelRun:
    """One "label the namespace, wait until every pod is annotated" measurement."""

    t_label: float  # monotonic time of the label patch
    seen: dict[str, float]  # pod uid -> monotonic time first seen annotated enabled
    cpu_before: tuple[float, float]  # the agent's (own, children) CPU s at the label
    cpu_after: tuple[float, float]  # ... once the last pod was seen

    @property
    def total_s(self) -> float:
        return max(self.seen.values()) - self.t_label

    def cpu_ms_per_pod(self, part: int) -> float:
        """0: the agent's own CPU, 1: its reaped children's, per pod, in ms."""
        return (self.cpu_after[part] - self.cpu_before[part]) * 1000 / len(self.seen)


def label_and_measure(
    core: Any, ln: LightNode, ns: str, agent_pid: int, pods: int, timeout: float
) -> LabelRun:
    """Label ``ns`` ambient and wait until all ``pods`` are seen annotated ``enabled`` on a
    watch, reading the agent's CPU times around it."""
    watcher = EnabledWatch(core, ns)
    watcher.start()
    time.sleep(0.5)  # the watch is open before the label
    cpu0 = _cpu_s(agent_pid)
    t_label = time.monotonic()
    ln.label_namespace(ns, dict(AMBIENT))
    try:
        wait_until(lambda: len(watcher.seen) >= pods, timeout, f"{pods} pods enabled", step=0.02)
        cpu1 = _cpu_s(agent_pid)
    finally:
        watcher.stop()
    return LabelRun(t_label, dict(watcher.seen), cpu0, cpu1)


def start_agent(
    tmp: Path,
    node_name: str,
    kubeconfig: str,
    node_ns: str,
    workers: int,
    backend: str,
    pin_root: str,
    netns: str | None = None,
) -> subprocess.Popen[bytes]:
    """Our agent as its own process (``istio-cni-agent run``) for node ``node_name``: run dir
    ``tmp/run``, ztunnel socket ``tmp/zt/ztunnel.sock``, host-probe rules in the namespace
    ``node_ns``, log ``tmp/agent.log``; living in ``netns`` if given (``nsenter`` execs, so
    the pid is the agent's). The caller terminates it."""
    env = dict(
        os.environ,
        NODE_NAME=node_name,
        KUBECONFIG=kubeconfig,
        CNI_AGENT_RUN_DIR=str(tmp / "run"),
        ZTUNNEL_UDS_ADDRESS=str(tmp / "zt" / "ztunnel.sock"),
        HOST_PROC="/proc",
        HOST_NETNS_DIR="/run/netns",
        NODE_NETNS=f"/run/netns/{node_ns}",
        HEALTH_PORT="0",
        MONITORING_PORT="0",
        AGENT_WORKERS=str(workers),
        REDIRECTION_BACKEND=backend,
        AMBIENT_EBPF_PIN_ROOT=pin_root,  # ebpf: this run's own pins, removed by the caller
        LOG_LEVEL="warning",
    )
    # Byte-code compiled first, as the image's pip install compiles it (this machine's
    # environment says PYTHONDONTWRITEBYTECODE: every start would compile the sources anew).
    root = Path(__file__).resolve().parents[1]
    for pkg in ("cni_plugin", "node_agent", "install"):
        compileall.compile_dir(root / pkg, quiet=1)
    argv = [sys.executable, "-m", "node_agent.cli", "run", "--listen-address", "127.0.0.1"]
    if netns is not None:
        argv = ["nsenter", f"--net={netns}", *argv]
    with open(tmp / "agent.log", "a") as log:  # the child keeps its own copy of the fd
        return subprocess.Popen(argv, env=env, stderr=log)


def run(
    pods: int, rss_pods: int, workers: int, kubeconfig: str, out: str | None, backend: str
) -> dict[str, Any]:
    core = _core(kubeconfig)
    ln = LightNode(core)
    tmp = Path(f"/var/tmp/icnia-bench-{ln.tag}")
    tmp.mkdir(parents=True)
    pin_root = f"/sys/fs/bpf/icnia-bench-{ln.tag}"
    node_ns = f"icnia-bnode-{ln.tag}"
    subprocess.run(["ip", "netns", "add", node_ns], check=True)
    agent: subprocess.Popen[bytes] | None = None
    rec: ZdsRecorder | None = None
    result: dict[str, Any] = {
        "pods": pods, "rss_pods": rss_pods, "workers": workers, "backend": backend,
        "load_avg_at_start": os.getloadavg()[0],
    }  # fmt: skip
    try:
        ln.create_node()
        ns = f"icnia-bench-{ln.tag}"
        ln.create_namespace(ns)
        t0 = time.monotonic()
        for i in range(pods):
            ln.add_pod(ns, f"p{i}")
        result["staging_s"] = round(time.monotonic() - t0, 1)
        agent = start_agent(tmp, ln.node_name, kubeconfig, node_ns, workers, backend, pin_root)
        rec = ZdsRecorder(str(tmp / "zt" / "ztunnel.sock"))
        rec.start()
        wait_until(lambda: rec is not None and rec.of("snapshot_sent"), 60, "agent ready")
        result["rss_idle_mb"] = round(_rss_mb(agent.pid), 1)
        run = label_and_measure(core, ln, ns, agent.pid, pods, 300)
        result["agent_cpu_ms_per_pod"] = {
            "own": round(run.cpu_ms_per_pod(0), 1),
            "subprocesses": round(run.cpu_ms_per_pod(1), 1),
        }
        total = run.total_s
        lat = [(t - run.t_label) * 1000 for t in run.seen.values()]
        state = json.loads((tmp / "run" / "agent-state.json").read_text())
        own = [p["latency_ms"] for p in state["pods"] if p.get("latency_ms")]
        steps: dict[str, list[float]] = {}
        for p in state["pods"]:
            for k, v in (p.get("steps_ms") or {}).items():
                steps.setdefault(k, []).append(v)
        result["agent_steps_p50_ms"] = {k: round(_pct(v, 50), 1) for k, v in steps.items()}
        result.update(
            {
                "all_enrolled_s": round(total, 3),
                "pods_per_s": round(pods / total, 1),
                "label_to_enabled_ms": {
                    "p50": round(_pct(lat, 50), 1),
                    "p90": round(_pct(lat, 90), 1),
                    "p99": round(_pct(lat, 99), 1),
                    "max": round(max(lat), 1),
                },
                "agent_enroll_ms": {
                    "p50": round(_pct(own, 50), 1),
                    "p90": round(_pct(own, 90), 1),
                    "p99": round(_pct(own, 99), 1),
                    "mean": round(statistics.fmean(own), 1),
                },
                "zds_adds": len(rec.of("add")),
                "rss_after_pods_mb": round(_rss_mb(agent.pid), 1),
            }
        )
        print(json.dumps(result), flush=True)
        if rss_pods > pods:
            t1 = time.monotonic()
            for i in range(pods, rss_pods):
                ln.add_pod(ns, f"p{i}")
            wait_until(
                lambda: sum(1 for v in ln.annotations(ns).values() if v == "enabled") >= rss_pods,
                600,
                f"{rss_pods} pods enabled",
                step=1.0,
            )
            result["rss_stage_s"] = round(time.monotonic() - t1, 1)
            time.sleep(2)
            result["rss_at_rss_pods_mb"] = round(_rss_mb(agent.pid), 1)
            result["agent_threads"] = len(os.listdir(f"/proc/{agent.pid}/task"))
    finally:
        if agent is not None:
            agent.terminate()
            agent.wait(timeout=30)
        if rec is not None:
            rec.stop()
        result["cleanup_problems"] = ln.cleanup()
        subprocess.run(["ip", "netns", "del", node_ns], capture_output=True)
        shutil.rmtree(pin_root, ignore_errors=True)
    print(json.dumps(result), flush=True)
    if out:
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--pods", type=int, default=200)
    p.add_argument("--rss-pods", type=int, default=1000)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--out", help="write the result JSON here")
    p.add_argument("--backend", default="iptables", choices=("iptables", "nftables", "ebpf"))
    args = p.parse_args()
    from testbed.node import Testbed

    bed = Testbed()
    brought_up = False
    if not bed.status().get("running"):
        bed.up()
        brought_up = True
    try:
        run(
            args.pods,
            args.rss_pods,
            args.workers,
            str(bed.layout.kubeconfig),
            args.out,
            args.backend,
        )
    finally:
        if brought_up:
            bed.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
