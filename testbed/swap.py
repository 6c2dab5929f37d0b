"""Istio's own node agent and ours swapped on a live node under traffic: ``python -m testbed.swap``.

Role: the migration path of issue 17, measured on the testbed's real node (kubelet,
containerd, the ztunnel stand-in speaking real ZDS). Istio's ``install-cni`` (built into the
cache by :mod:`bench.istio_peer`, run as its DaemonSet runs it by :mod:`bench.istio_agent`)
enrols the pods of :mod:`testbed.enroll_traffic` (four servers, two clients running
:mod:`testbed.traffic`); under that traffic its agent is replaced by ours, then ours by
Istio's again. The ``istio-cni-node`` DaemonSet object exists throughout (it targets this
node), so each leaving agent takes the upgrade path and leaves rules and plugin in place.

Each handover: SIGTERM to the running agent, the other one started (ours: installer and
agent, as our DaemonSet runs them), until the stand-in has received the new agent's ZDS
snapshot. Recorded: seconds from the SIGTERM to that snapshot, the snapshot's workloads, and
what the stand-in did with every pod (a pod adopted is an Add for the netns it already
serves: no proxy restarted, none dropped); the in-pod rules of every pod (``iptables-save``,
both families, counters stripped) before and after, which must not change (no re-enrolment);
our agent's start-up rule check (no pod repaired).

Then each plugin against the other's agent, one new pod each in the ambient namespace plus
one in a namespace that is not ambient: Istio's plugin binary left on the node while our
agent and installer run (ours installed into a directory of their own), and ours while
Istio's agent runs (its installer given a directory of its own). The ambient pod must be
enrolled (annotated by the running agent, proxied by the stand-in), the other must start.

Returns (and prints, as JSON) the figures; the node is always brought down.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.istio_agent import (
    ENABLEMENT_SELECTOR,
    mount_script,
    prepare,
    service_account_from_kubeconfig,
)
from bench.istio_agent import install_env as istio_env
from bench.istio_peer import DEFAULT_VERSION, PeerBinaries, ensure_peer
from cni_plugin import constants as c
from testbed import cleanup
from testbed.demo_cluster import is_ready, redirection_annotation
from testbed.demo_node import pod_pid
from testbed.enroll_report import epoch, summarise
from testbed.enroll_traffic import CLIENTS, NS, SERVERS, Scenario, ScenarioError
from testbed.layout import Layout
from testbed.mesh import mesh_env, start_standin
from testbed.node import Testbed

ISTIO_NS = "istio-system"
PLAIN_NS = "swap-plain"  # not ambient: a pod here must start whatever agent runs
DEFAULT_ORDER = ("istio", "ours", "istio")
HOLD_S = 6.0  # traffic under each agent after its handover
HANDOVER_TIMEOUT = 120.0
REPO = Path(__file__).resolve().parents[1]
OUR_PLUGIN = REPO / "build" / "istio-cni"
# What the stand-in logs when a handover disturbed a pod it was serving.
DISTURBED = ("proxy started", "proxy stopped", "netns changed: replacing proxy",
             "not in the new snapshot: dropping")  # fmt: skip


def _wait(what: str, probe: Callable[[], Any], timeout: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = probe()
        if got:
            return got
        time.sleep(0.1)
    raise ScenarioError(f"{what}: not after {timeout:g}s")


def daemonset(node: str, image: str) -> str:
    """The ``istio-cni-node`` DaemonSet object both agents' upgrade check looks for, bound to
    ``node``; its pod only sleeps (the agents run as host processes here)."""
    return json.dumps({
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "istio-cni-node", "namespace": ISTIO_NS},
        "spec": {
            "selector": {"matchLabels": {"k8s-app": "istio-cni-node"}},
            "template": {
                "metadata": {"labels": {"k8s-app": "istio-cni-node"}},
                "spec": {
                    "hostNetwork": True,
                    "nodeSelector": {"kubernetes.io/hostname": node},
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{"name": "install-cni", "image": image,
                                    "command": ["/bin/sh", "-c", "exec sleep 100000"]}],
                },
            },
        },
    })  # fmt: skip


def _plain_pod(name: str, ns: str, image: str) -> str:
    return json.dumps({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
        "spec": {"terminationGracePeriodSeconds": 1, "containers": [
            {"name": "app", "image": image, "command": ["/bin/sh", "-c", "exec sleep 100000"]}]},
    })  # fmt: skip


_COUNTERS = re.compile(r"\[\d+:\d+\]")


def pod_rules(pid: int) -> str:
    """The pod's iptables state, both families and both kernel interfaces, without
    comments and counters (what must not change when an agent adopts the pod)."""
    out = []
    for tool in ("iptables-save", "ip6tables-save", "iptables-legacy-save",
                 "ip6tables-legacy-save"):  # fmt: skip
        got = subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", "--", tool],
                             capture_output=True, text=True, timeout=30)  # fmt: skip
        lines = [_COUNTERS.sub("", ln) for ln in got.stdout.splitlines() if ln[:1] != "#"]
        out.append(f"== {tool}\n" + "\n".join(lines))
    return "\n".join(out)


class Swap:
    """The node, the traffic and whichever agent runs now (one at a time)."""

    def __init__(self, bed: Testbed, info: dict[str, Any], peer: PeerBinaries | None) -> None:
        self.bed = bed
        self.info = info
        self.peer = peer
        self.scenario = Scenario(bed, info, "iptables")
        self.k = self.scenario.k
        self.scratch = Path(info["run_dir"]) / "swap"
        self.agent: subprocess.Popen[bytes] | None = None
        self.kind = ""
        self.ours_env = {
            **mesh_env(info, "iptables"),
            # As Istio's chart: the DaemonSet's namespace, DNS capture on (Istio's default).
            "POD_NAMESPACE": ISTIO_NS,
            "AMBIENT_DNS_CAPTURE": "true",
            "AMBIENT_ENABLEMENT_SELECTOR": ENABLEMENT_SELECTOR,
        }
        self.istio_starts = 0

    # --- agents ----------------------------------------------------------------------------
    def start_istio(self, own_bin_dir: bool = False) -> None:
        """Istio's agent on the node: its volumes are the node's dirs (the CNI bin dir one
        of its own with ``own_bin_dir``), its pid namespace its own (``mount_script``)."""
        if self.peer is None:
            raise ScenarioError("Istio's binaries are needed: run `make istio-peer` first")
        self.istio_starts += 1
        scratch = self.scratch / f"istio-{self.istio_starts}"
        kube = Path(self.info["kubeconfig_node"])
        prepare(scratch, kube)
        _token, _ca, host, port = service_account_from_kubeconfig(kube)
        volumes = {
            "net.d": self.info["cni_conf_dir"],
            "run": self.info["istio_cni_run_dir_in_node"],
            "zt": str(Path(self.info["ztunnel_socket_in_node"]).parent),
            "/run/netns": self.info["cni_netns_dir_in_node"],
        }
        if not own_bin_dir:
            volumes["cni-bin"] = self.info["cni_bin_dir"]
        script = mount_script(scratch, self.peer, volumes, own_pid_namespace=True,
                              host_proc=self.host_proc())  # fmt: skip
        # Its "CNI plugin event" lines (evidence of the plugin's cmdadd) are debug-level.
        script = script.replace("--log_output_level=info",
                                "--log_output_level=default:info,cni-agent:debug")  # fmt: skip
        env = istio_env(self.info["node"], host, port)
        env["POD_NAMESPACE"] = ISTIO_NS
        with open(Path(self.info["logs_dir"]) / "istio-cni-node.log", "ab") as log:
            self.agent = subprocess.Popen(
                [*self.info["nsenter"], "unshare", "-m", "--propagation", "unchanged",
                 "sh", "-c", script],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.kind = "istio"

    def host_proc(self) -> dict[str, int]:
        """The processes of the node's pods (Istio's agent finds their namespaces there),
        and as ``"1"`` a process of the node's own namespace (the stand-in)."""
        pids: dict[str, int] = {}
        for root in self.bed.layout.cgroup_dirs():
            for procs in root.glob("kubepods/**/cgroup.procs"):
                for pid in procs.read_text().split():
                    pids[pid] = int(pid)
        pids["1"] = self.bed._launcher.pids["ztunnel-standin"]
        return pids

    def start(self, kind: str, own_bin_dir: bool = False) -> None:
        (self.start_istio if kind == "istio" else self.start_ours)(own_bin_dir)

    def start_ours(self, own_bin_dir: bool = False) -> None:
        """Our installer and agent as ``up --mesh`` runs them (the installer's plugin into a
        directory of its own with ``own_bin_dir``)."""
        env = dict(self.ours_env)
        if own_bin_dir:
            bin_dir = self.scratch / "ours-bin"
            bin_dir.mkdir(parents=True, exist_ok=True)
            env["CNI_BIN_TARGET_DIRS"] = str(bin_dir)
        launch = self.bed._launcher
        agent = [sys.executable, "-m", "node_agent.cli"]
        launch.start("istio-cni-install", [*agent, "install"], env=env)
        self.agent = launch.start("istio-cni-agent", [*agent, "run"], env=env)
        self.kind = "ours"

    def stop_agent(self) -> None:
        """SIGTERM the running agent (and our installer) and wait for them to exit."""
        procs: list[subprocess.Popen[bytes]] = []
        if self.kind == "ours":
            ours = ("istio-cni-agent", "istio-cni-install")
            procs = [p for n, p in self.bed._launcher.procs.items()
                     if n in ours and p.poll() is None]  # fmt: skip
        elif self.agent is not None:
            procs = [self.agent]
        for p in procs:
            target = p.pid
            if self.kind == "istio":  # unshare --fork: the agent is its only child
                children = Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()
                target = int(children[0]) if children else p.pid
            os.kill(target, signal.SIGTERM)
        for p in procs:
            p.wait(timeout=60)
        self.agent, self.kind = None, ""

    # --- observations ----------------------------------------------------------------------
    def uids(self) -> dict[str, str]:
        return {n: p["metadata"]["uid"] for n, p in self.k.pods(NS).items()}

    def standin(self, since: float) -> list[dict[str, Any]]:
        return [r for r in self.k.log_records("ztunnel-standin") if epoch(r.get("time")) > since]

    def snapshot_after(self, since: float) -> dict[str, Any] | None:
        recs = [r for r in self.standin(since) if r.get("msg") == "snapshot received"]
        return recs[0] if recs else None

    def rules(self) -> dict[str, str]:
        return {n: pod_rules(pod_pid(self.bed.layout, u)) for n, u in self.uids().items()
                if n in SERVERS + CLIENTS}  # fmt: skip

    def pod_ips(self) -> set[str]:
        pods = self.k.pods(NS)
        return {pods[n]["status"]["podIP"] for n in SERVERS + CLIENTS if n in pods}

    def probe_set(self) -> set[str]:
        """Members of the node's host-probe ipset (both agents keep the same one)."""
        got = self.bed.node_exec(["ipset", "list", c.PROBE_IPSET_V4], check=False)
        members = got.stdout.split("Members:", 1)[-1].split() if "Members:" in got.stdout else []
        return {m for m in members if m.count(".") == 3}

    def all_annotated(self) -> bool:
        pods = self.k.pods(NS)
        return all(n in pods and redirection_annotation(pods[n]) == c.REDIRECTION_ENABLED
                   for n in SERVERS + CLIENTS)  # fmt: skip

    # --- steps -----------------------------------------------------------------------------
    def handover(self, to: str, phase: str, then: str, own_bin_dir: bool = False) -> dict[str, Any]:
        """Replace the running agent by ``to`` under traffic; the figures of the handover."""
        self.scenario.command(f"phase {phase}")
        before = self.rules()
        t0 = time.time()
        self.stop_agent()
        stopped = time.time()
        self.start(to, own_bin_dir)
        snap = _wait(f"{to}'s ZDS snapshot after the handover",
                     lambda: self.snapshot_after(t0), HANDOVER_TIMEOUT)  # fmt: skip
        done = epoch(snap.get("time"))
        self.scenario.command(f"phase {then}")  # the new agent serves from here on
        uids = {u: n for n, u in self.uids().items() if n in SERVERS + CLIENTS}
        events = [r for r in self.standin(t0) if r.get("uid") in uids]
        out: dict[str, Any] = {
            "to": to,
            "old_agent_exit_s": round(stopped - t0, 2),
            "handover_s": round(done - t0, 2),
            "snapshot_workloads": snap.get("workloads"),
            "snapshot_dropped": snap.get("dropped"),
            "pods_adopted": sorted(uids[r["uid"]] for r in events
                                   if r.get("msg") == "add for a known netns: no-op"),
            "pods_disturbed": sorted(f"{uids[r['uid']]}: {r['msg']}" for r in events
                                     if r.get("msg") in DISTURBED),
        }  # fmt: skip
        if to == "ours":
            out["our_startup_check"] = _wait("our agent's start-up rule check",
                                             lambda: self._our_first_pass(t0), 60)  # fmt: skip
        time.sleep(HOLD_S)
        self.scenario.command("rotate")  # long-lived connections made under this agent
        time.sleep(0.5)
        after = self.rules()
        out["rules_changed"] = sorted(n for n in before if before[n] != after.get(n))
        out["probe_set_complete"] = self.probe_set() >= self.pod_ips()
        out["annotated_after"] = self.all_annotated()
        out["ready_after"] = all(is_ready(p) for p in self.k.pods(NS).values())
        return out

    def plugin_posted(self, name: str) -> bool:
        """Whether the running agent logged the plugin's ``cmdadd`` for pod ``NS/name`` (the
        pod was enrolled by the plugin, not only found by the agent's informer)."""
        if self.kind == "istio":
            text = (Path(self.info["logs_dir"]) / "istio-cni-node.log").read_text(errors="replace")
            return any("Deserialized CNI plugin event" in ln and f"PodName:{name} " in ln
                       for ln in text.splitlines())  # fmt: skip
        for r in self.k.log_records("istio-cni-agent"):
            pod = r.get("pod")
            who = f"{pod.get('namespace')}/{pod.get('name')}" if isinstance(pod, dict) else pod
            if r.get("msg") == "plugin asked to enroll pod" and who == f"{NS}/{name}":
                return True
        return False

    def back_to(self, start: Callable[[bool], None]) -> None:
        """Stop the running agent, ``start(own_bin_dir=True)`` the other, until its snapshot."""
        t0 = time.time()
        self.stop_agent()
        start(True)
        _wait("the agent's ZDS snapshot", lambda: self.snapshot_after(t0), HANDOVER_TIMEOUT)

    def _our_first_pass(self, since: float) -> dict[str, Any] | None:
        for r in self.k.log_records("istio-cni-agent"):
            if r.get("msg") == "reconcile pass done" and epoch(r.get("time")) > since:
                return {k: r.get(k) for k in ("checked", "rules_repaired", "netns_replaced",
                                              "netns_found", "errors")}  # fmt: skip
        return None

    def new_pods(self, tag: str, plugin: Path) -> dict[str, Any]:
        """One ambient and one plain pod made while ``plugin`` is the node's istio-cni and
        the other project's agent runs; whether each got what it should."""
        from install import binaries

        bin_dir = self.info["cni_bin_dir"]
        # As an installer puts it there (ours is a directory: launcher and interpreter).
        binaries.install_binary(str(plugin), bin_dir)
        image = self.info["images"]["busybox"]
        amb, plain = f"new-{tag}", f"plain-{tag}"
        self.bed.kubectl("apply", "-f", "-", input=_plain_pod(amb, NS, image))
        self.bed.kubectl("apply", "-f", "-", input=_plain_pod(plain, PLAIN_NS, image))
        t0 = time.monotonic()

        def ready(ns: str, name: str) -> bool:
            pod = self.k.pod(ns, name)
            return pod is not None and is_ready(pod)

        kept = binaries.matches(str(plugin), bin_dir)
        out: dict[str, Any] = {"plugin_sha_kept": kept, "agent": self.kind}
        try:
            _wait(f"pod {NS}/{amb} Ready", lambda: ready(NS, amb), 90)
            _wait(f"pod {NS}/{amb} annotated", lambda: redirection_annotation(
                self.k.pod(NS, amb) or {}) == c.REDIRECTION_ENABLED, 30)  # fmt: skip
            out["ambient_enrolled_s"] = round(time.monotonic() - t0, 2)
            uid = (self.k.pod(NS, amb) or {})["metadata"]["uid"]
            out["ambient_proxied"] = bool(_wait(f"stand-in proxy for {amb}", lambda: any(
                r.get("uid") == uid and r.get("msg") == "proxy started"
                for r in self.k.log_records("ztunnel-standin")), 30))  # fmt: skip
            out["ambient_via_plugin"] = self.plugin_posted(amb)
            _wait(f"pod {PLAIN_NS}/{plain} Ready", lambda: ready(PLAIN_NS, plain), 90)
            out["plain_started"] = True
            out["plain_annotation"] = redirection_annotation(self.k.pod(PLAIN_NS, plain) or {})
        except ScenarioError as e:
            out["error"] = str(e)
            got = self.bed.kubectl("get", "events", "-A", check=False).stdout
            out["events"] = [ln for ln in got.splitlines() if amb in ln or plain in ln][-8:]
            if self.kind == "istio":
                text = (Path(self.info["logs_dir"]) / "istio-cni-node.log").read_text()
                out["agent_log"] = [ln[:400] for ln in text.splitlines() if amb in ln][-8:]
        out["plugin_sha_kept"] = kept and binaries.matches(str(plugin), bin_dir)
        return out


def phases(order: Sequence[str]) -> list[str]:
    """The traffic phases of a run whose agents come in ``order`` (three of them)."""
    a, b, c_ = order
    return ["baseline", a, f"to-{b}", b, f"to-{c_}", f"{c_}-again"]


def run(
    instance: str,
    istio_version: str = DEFAULT_VERSION,
    order: Sequence[str] = DEFAULT_ORDER,
    cross_plugins: bool = True,
) -> dict[str, Any]:
    """The whole scenario on a node of its own; always brought down. ``order`` other than
    the default (``ours,ours,ours``) checks this harness without Istio's binaries."""
    if not OUR_PLUGIN.exists():
        raise ScenarioError(f"{OUR_PLUGIN} missing: run `make build/istio-cni` first")
    if len(order) != 3 or set(order) - {"istio", "ours"}:
        raise ScenarioError(
            f"--order {','.join(order)}: three of istio/ours, e.g. istio,ours,istio"
        )
    need_peer = cross_plugins or "istio" in order
    peer = ensure_peer(istio_version) if need_peer else None
    layout = Layout.for_instance(instance)
    bed = Testbed(layout)
    names = phases(order)
    result: dict[str, Any] = {"instance": instance, "order": list(order),
                              "istio_version": peer.version if peer else None}  # fmt: skip
    started = time.monotonic()
    swap: Swap | None = None
    try:
        info = bed.up(mesh=False, backend="iptables")
        swap = Swap(bed, info, peer)
        for ns in (ISTIO_NS, PLAIN_NS):
            bed.kubectl("create", "namespace", ns)
        bed.kubectl("apply", "-f", "-", input=daemonset(info["node"], info["images"]["busybox"]))
        start_standin(bed, info, swap.ours_env)
        # The pods first: Istio's agent here sees only the processes there are at its start.
        swap.scenario.deploy()
        swap.start(order[0])
        _wait(f"{order[0]}'s first ZDS snapshot", lambda: swap.snapshot_after(0), HANDOVER_TIMEOUT)
        t0 = time.monotonic()
        bed.kubectl("label", "namespace", NS,
                    f"{c.DATAPLANE_MODE_LABEL}={c.DATAPLANE_MODE_AMBIENT}")  # fmt: skip
        _wait(f"every pod enrolled by {order[0]}'s agent", swap.all_annotated, 90)
        result["first_enrol_s"] = round(time.monotonic() - t0, 2)
        swap.scenario.start_traffic()
        swap.scenario.command(f"phase {names[1]}")
        time.sleep(HOLD_S)
        swap.scenario.command("rotate")
        handovers = [swap.handover(order[1], names[2], names[3])]
        handovers.append(swap.handover(order[2], names[4], names[5]))
        reports = swap.scenario.stop_traffic()
        counts = summarise(reports, names)
        failures = [{**f, "client": cl} for cl, rep in reports.items() for f in rep["failures"]]
        # Each plugin against the other's agent (after the traffic; new pods only): the
        # starting agent's installer writes into a bin dir of its own, the node's keeps
        # the other project's plugin.
        cross: dict[str, Any] = {}
        if cross_plugins and peer is not None:
            for key, start, plugin, tag in (
                ("our_plugin_istio_agent", swap.start_istio, OUR_PLUGIN, "a"),
                ("istio_plugin_our_agent", swap.start_ours, peer.path("istio-cni"), "b"),
            ):
                swap.back_to(start)
                cross[key] = swap.new_pods(tag, plugin)
        result.update(counts=counts, failures=failures, handovers=handovers, cross=cross)
    finally:
        if swap is not None:
            swap.scenario.kill_traffic()
            try:
                swap.stop_agent()
            except (OSError, subprocess.TimeoutExpired) as e:
                result["stop_problem"] = str(e)
        result["down_problems"] = bed.down()
        result["leftovers"] = cleanup.leftovers(layout)
        result["seconds"] = round(time.monotonic() - started, 1)
        result["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    return result


def table(result: dict[str, Any]) -> str:
    lines = ["| handover | old agent exit, s | SIGTERM -> snapshot, s | pods adopted | "
             "disturbed | rules changed |", "|---|---:|---:|---:|---|---|"]  # fmt: skip
    for h in result.get("handovers", []):
        lines.append(f"| to {h['to']} | {h['old_agent_exit_s']} | {h['handover_s']} | "
                     f"{len(h['pods_adopted'])}/{h['snapshot_workloads']} | "
                     f"{len(h['pods_disturbed'])} | {len(h['rules_changed'])} |")  # fmt: skip
    lines += ["", "| phase | new conns sent/failed | long-lived pings sent/failed |",
              "|---|---:|---:|"]  # fmt: skip
    for phase, row in result.get("counts", {}).items():
        lines.append(f"| {phase} | {row['new']['sent']}/{row['new']['failed']} | "
                     f"{row['long']['sent']}/{row['long']['failed']} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m testbed.swap", description=__doc__.split("\n")[0])
    p.add_argument("--instance", default=os.environ.get("ISTIO_CNI_TESTBED_INSTANCE") or "swap")
    p.add_argument("--istio-version", default=DEFAULT_VERSION)
    p.add_argument(
        "--order",
        default=",".join(DEFAULT_ORDER),
        help="the three agents in turn (ours,ours,ours checks the harness alone)",
    )
    p.add_argument("--no-cross", action="store_true", help="skip the cross-plugin runs")
    p.add_argument("--json", help="write the full result here")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("testbed.swap: needs root (the testbed): run it with sudo", file=sys.stderr)
        return 2
    try:
        result = run(args.instance, args.istio_version, args.order.split(","), not args.no_cross)
    except ScenarioError as e:
        print(f"testbed.swap: {e}", file=sys.stderr)
        return 1
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    print(f"istio.io/istio {result['istio_version']}, order {result['order']}, "
          f"{result['seconds']}s, load {result['loadavg']}")  # fmt: skip
    print(table(result))
    print(json.dumps(result.get("cross"), indent=1))
    failed = sum(r[k]["failed"] for r in result.get("counts", {}).values() for k in ("new", "long"))
    return 0 if failed == 0 and not result["down_problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
