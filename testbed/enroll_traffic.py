"""Joining and leaving the mesh under traffic, counted: ``python -m testbed.enroll_traffic``.

Role: the scenario of issue 19 on the testbed's real node, one backend per run. The node
comes up with the mesh (our installer, agent and the ztunnel stand-in, as ``up --mesh``);
namespace ``enroll`` gets four servers (``srv-0..3``: busybox ``httpd`` on 8080 and a line
echo server on 9000) and two clients (``cli-0``, ``cli-1``), each client running
:mod:`testbed.traffic` inside its network namespace against all four servers (new
connections and long-lived ones). Then, under that traffic, phase by phase:

``baseline`` nothing changes; ``label`` the namespace gets ``istio.io/dataplane-mode=ambient``;
``unlabel`` the label goes; ``relabel`` it comes back; ``opt-out`` pod ``srv-0`` gets
``istio.io/dataplane-mode=none``; ``opt-in`` that label goes. Each phase lasts until every pod
shows the wanted ``ambient.istio.io/redirection`` annotation, plus ``SETTLE`` seconds; then
the ``fresh`` long-lived connections are re-opened so the next change is crossed by
connections made in the state before it.

Returns (and prints, as JSON) requests sent and failed per phase, every failure with the
agent's and stand-in's log lines about the two pods involved around that moment (the
evidence), and the node is always brought down. Own instance ``enroll`` (or ``--instance``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cni_plugin import constants as c
from node_agent.enrollment import LEAVE_GRACE_S
from testbed import cleanup
from testbed.demo_cluster import Cluster, is_ready, redirection_annotation
from testbed.demo_node import pod_pid
from testbed.enroll_report import drained_by_ztunnel, epoch, evidence, summarise, table
from testbed.layout import Layout
from testbed.node import BACKENDS, Testbed
from testbed.ztunnel_standin.workloads import DRAIN_SECONDS

NS = "enroll"
SERVERS = [f"srv-{i}" for i in range(4)]
CLIENTS = ["cli-0", "cli-1"]
OPT_OUT = "srv-0"
SETTLE = 2.0
# A leaving pod's proxy: the agent's grace before the Del, then ztunnel's drain deadline.
LEAVE_SETTLE = LEAVE_GRACE_S + DRAIN_SECONDS + 1.5
PHASE_TIMEOUT = 60.0
BASELINE_MIN = 15  # attempts of each kind per client before the first change (2 clients)
REPO = Path(__file__).resolve().parents[1]
SERVER_SCRIPT = (
    'mkdir -p /www && echo "$HOSTNAME" > /www/index.html && '
    "busybox httpd -f -p 8080 -h /www & H=$!; busybox nc -ll -p 9000 -e cat & N=$!; "
    'trap "kill $H $N 2>/dev/null; exit 0" TERM INT; wait'
)


HTTP_PROBE = {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1}
EXEC_PROBE = {"exec": {"command": ["true"]}, "periodSeconds": 1}


class ScenarioError(RuntimeError):
    """The scenario could not run (a pod never got Ready, a phase never completed)."""


def _pod(name: str, image: str, command: list[str] | None, probe: dict[str, Any]) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "app", "image": image, "readinessProbe": probe}
    if command:
        container["command"] = command
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": {"app": name}},
        "spec": {"terminationGracePeriodSeconds": 2, "containers": [container]},
    }


def manifests(images: dict[str, str]) -> str:
    servers = [
        _pod(n, images["busybox"], ["/bin/sh", "-c", SERVER_SCRIPT], HTTP_PROBE) for n in SERVERS
    ]
    clients = [_pod(n, images["busybox"], None, EXEC_PROBE) for n in CLIENTS]
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": servers + clients})


def _wait(what: str, probe: Callable[[], bool], timeout: float = PHASE_TIMEOUT) -> float:
    started = time.monotonic()
    while not probe():
        if time.monotonic() - started > timeout:
            raise ScenarioError(f"{what}: not after {timeout:g}s")
        time.sleep(0.1)
    return time.monotonic() - started


class Scenario:
    def __init__(self, bed: Testbed, info: dict[str, Any], backend: str) -> None:
        self.bed = bed
        self.info = info
        self.backend = backend
        self.k = Cluster(bed, info)
        self.gens: dict[str, subprocess.Popen[str]] = {}
        self.marks: list[dict[str, Any]] = []
        self.captures: list[subprocess.Popen[bytes]] = []
        self.conntrack: dict[str, str] = {}  # "<phase> before|after" -> cli-0's table
        self.pids: dict[str, int] = {}

    # --- set-up --------------------------------------------------------------------------
    def deploy(self) -> None:
        self.bed.kubectl("create", "namespace", NS)
        _wait("default service account", self._default_sa)
        images = {"busybox": self.info["images"]["busybox"]}
        _wait("pods accepted", lambda: self._apply(manifests(images)))
        _wait("pods Ready", lambda: all(is_ready(p) for p in self._pods().values()), 120)

    def _default_sa(self) -> bool:
        accounts = self.k.core.list_namespaced_service_account(NS).items
        return any(a.metadata and a.metadata.name == "default" for a in accounts)

    def _apply(self, manifest: str) -> bool:
        """``kubectl apply``; False while the API refuses pods for a service account token
        still being made (Kubernetes before 1.24 keeps tokens in Secrets)."""
        done = self.bed.kubectl("apply", "-f", "-", input=manifest, check=False)
        if done.returncode == 0:
            return True
        if "token" in done.stderr and "service account" in done.stderr.lower():
            return False
        raise ScenarioError(f"kubectl apply of the scenario's pods failed: {done.stderr.strip()}")

    def _pods(self) -> dict[str, dict[str, Any]]:
        pods = self.k.pods(NS)
        return pods if set(pods) >= set(SERVERS + CLIENTS) else {}

    def start_traffic(self) -> None:
        pods = self._pods()
        targets = [f"{pods[n]['status']['podIP']}={n}" for n in SERVERS]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        for name in CLIENTS:
            pid = pod_pid(self.bed.layout, pods[name]["metadata"]["uid"])
            self.pids[name] = pid
            self.gens[name] = subprocess.Popen(
                ["nsenter", f"--net=/proc/{pid}/ns/net", "--", sys.executable, "-m",
                 "testbed.traffic", "--max-seconds", "400", "--phase", "baseline", *targets],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO,
            )  # fmt: skip

    def start_capture(self, path: str) -> None:
        """tcpdump on every interface of each client (lo included): where its packets
        went; ``path`` for ``cli-0``, ``path.cli-1`` for the other."""
        for i, name in enumerate(CLIENTS):
            out = path if i == 0 else f"{path}.{name}"
            self.captures.append(subprocess.Popen(
                ["nsenter", f"--net=/proc/{self.pids[name]}/ns/net", "--", "tcpdump",
                 "-i", "any", "-nn", "-s", "96", "-U", "-w", out, "tcp"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            ))  # fmt: skip

    def stop_capture(self) -> None:
        for capture in self.captures:
            capture.terminate()
            capture.wait(10)
        self.captures.clear()

    def snapshot_conntrack(self, label: str) -> None:
        """``conntrack -L -p tcp`` in ``cli-0`` (NAT bindings of its connections)."""
        if not self.pids:
            return
        proc = subprocess.run(
            ["nsenter", f"--net=/proc/{self.pids[CLIENTS[0]]}/ns/net", "--", "conntrack",
             "-L", "-p", "tcp"], capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        self.conntrack[label] = proc.stdout

    def command(self, line: str) -> None:
        for gen in self.gens.values():
            assert gen.stdin is not None
            gen.stdin.write(line + "\n")
            gen.stdin.flush()

    def baseline_carried(self) -> bool:
        """Each generator's current phase has ``BASELINE_MIN`` attempts of each kind (asked
        with ``progress``; the answer is one line on its stdout, before its final report)."""
        self.command("progress")
        counts = []
        for gen in self.gens.values():
            assert gen.stdout is not None
            counts.append(json.loads(gen.stdout.readline()))
        return all(c["new"] >= BASELINE_MIN and c["long"] >= BASELINE_MIN for c in counts)

    def stop_traffic(self) -> dict[str, dict[str, Any]]:
        reports: dict[str, dict[str, Any]] = {}
        for name, gen in self.gens.items():
            try:
                out, _ = gen.communicate("stop\n", timeout=30)
                reports[name] = json.loads(out.strip().splitlines()[-1])
            except (subprocess.TimeoutExpired, ValueError, IndexError) as e:
                gen.kill()
                gen.wait()
                raise ScenarioError(f"traffic generator in {name} gave no report: {e}") from e
        self.gens.clear()
        return reports

    def kill_traffic(self) -> None:
        for gen in self.gens.values():
            gen.kill()
            gen.wait()
        self.gens.clear()

    # --- phases --------------------------------------------------------------------------
    def phase(
        self, name: str, action: list[str], want: dict[str, str | None], settle: float = SETTLE
    ) -> None:
        """Run ``kubectl action`` under traffic; wait for the annotations in ``want``, then
        ``settle`` seconds (for leaving pods: until their proxies have drained)."""
        self.command(f"phase {name}")
        self.snapshot_conntrack(f"{name} before")
        started = time.time()
        self.bed.kubectl(*action)

        def reached() -> bool:
            pods = self.k.pods(NS)
            return all(n in pods and redirection_annotation(pods[n]) == v for n, v in want.items())

        took = _wait(f"phase {name}: annotations {want}", reached)
        time.sleep(0.3)
        self.snapshot_conntrack(f"{name} after")
        time.sleep(settle)
        self.marks.append({"phase": name, "start": started, "converged_s": round(took, 2),
                           "action": "kubectl " + " ".join(action)})  # fmt: skip
        self.command("rotate")
        time.sleep(0.5)  # the fresh connections re-open inside this phase

    def run_phases(self) -> None:
        every = SERVERS + CLIENTS
        label = f"{c.DATAPLANE_MODE_LABEL}={c.DATAPLANE_MODE_AMBIENT}"
        on = dict.fromkeys(every, c.REDIRECTION_ENABLED)
        off: dict[str, str | None] = dict.fromkeys(every, None)
        # Baseline: the generators started in it; it lasts until each has made enough
        # attempts of both kinds to prove something (a loaded machine starts them slowly).
        _wait("baseline: traffic from every client", self.baseline_carried)
        self.phase("label", ["label", "namespace", NS, label], dict(on))
        unlabel = ["label", "namespace", NS, f"{c.DATAPLANE_MODE_LABEL}-"]
        self.phase("unlabel", unlabel, off, LEAVE_SETTLE)
        self.phase("relabel", ["label", "namespace", NS, label], dict(on))
        opt_out = f"{c.DATAPLANE_MODE_LABEL}={c.DATAPLANE_MODE_NONE}"
        self.phase("opt-out", ["label", "pod", "-n", NS, OPT_OUT, opt_out],
                   {**on, OPT_OUT: None}, LEAVE_SETTLE)  # fmt: skip
        self.phase("opt-in", ["label", "pod", "-n", NS, OPT_OUT, f"{c.DATAPLANE_MODE_LABEL}-"],
                   dict(on))  # fmt: skip

    # --- evidence ------------------------------------------------------------------------
    def timeline(self) -> list[dict[str, Any]]:
        """The agent's and the stand-in's lines about this namespace's pods, by time."""
        pods = self.k.pods(NS)
        by_uid = {p["metadata"]["uid"]: n for n, p in pods.items()}
        by_ip = {p["status"].get("podIP"): n for n, p in pods.items()}
        events: list[dict[str, Any]] = []
        for source in ("istio-cni-agent", "ztunnel-standin"):
            for rec in self.k.log_records(source):
                who = _pod_of(rec, by_uid, by_ip)
                if who is None:
                    continue
                events.append({"time": epoch(rec.get("time")), "source": source, "pod": who,
                               "msg": rec.get("msg"), "error": rec.get("error")})  # fmt: skip
        return sorted(events, key=lambda e: e["time"])


def _pod_of(rec: dict[str, Any], by_uid: dict[str, str], by_ip: dict[Any, str]) -> str | None:
    pod = rec.get("pod")
    if isinstance(pod, dict) and pod.get("namespace") == NS:
        return str(pod.get("name"))
    if isinstance(pod, str) and pod.startswith(f"{NS}/"):
        return pod.split("/", 1)[1]
    uid = rec.get("uid")
    if isinstance(uid, str) and uid in by_uid:
        return by_uid[uid]
    for ip in rec.get("ips") or []:
        if ip in by_ip:
            return by_ip[ip]
    return None


PHASES = ["baseline", "label", "unlabel", "relabel", "opt-out", "opt-in"]


def bpf_counters(pin_root: Path) -> dict[str, dict[str, int]]:
    """The ebpf backend's packet counters per loaded variant under ``pin_root``, read before
    the node goes: ``port_remap`` counts the connections that shared a client port with an
    open one and were given another (issue 19)."""
    from cni_plugin.bpf import programs, syscall

    out: dict[str, dict[str, int]] = {}
    for path in sorted(pin_root.glob("progs/*/counters")):
        fd = syscall.obj_get(str(path))
        try:
            raw = [syscall.map_lookup(fd, i.to_bytes(4, "little"), 8) for i in
                   range(len(programs.COUNTER_NAMES))]  # fmt: skip
        finally:
            os.close(fd)
        values = [int.from_bytes(r, "little") if r else 0 for r in raw]
        out[path.parent.name] = dict(zip(programs.COUNTER_NAMES, values, strict=True))
    return out


def run(backend: str, instance: str, capture: str | None = None) -> dict[str, Any]:
    """The whole scenario on a node of its own; always brought down. ``capture``: pcap
    files of the clients' packets (all their interfaces)."""
    layout = Layout.for_instance(instance)
    bed = Testbed(layout)
    result: dict[str, Any] = {"backend": backend, "instance": instance}
    started = time.monotonic()
    scenario: Scenario | None = None
    try:
        info = bed.up(mesh=True, backend=backend)
        scenario = Scenario(bed, info, backend)
        scenario.deploy()
        scenario.start_traffic()
        if capture:
            scenario.start_capture(capture)
        scenario.run_phases()
        reports = scenario.stop_traffic()
        scenario.stop_capture()
        if backend == "ebpf":
            result["bpf_counters"] = bpf_counters(layout.bpf_pin_root)
        events = scenario.timeline()
        pods = scenario.k.pods(NS)
        ip_names = {p["status"]["podIP"]: n for n, p in pods.items()}
        failures = []
        for client, rep in reports.items():
            for f in rep["failures"]:
                f = {**f, "client": client, "target_pod": ip_names.get(f["target"].split()[0])}
                f["evidence"] = evidence(f, client, events, ip_names)
                f["by_design"] = drained_by_ztunnel(f, client, f["target_pod"], events)
                failures.append(f)
        counts = summarise(reports, PHASES)
        for f in failures:  # ends by ztunnel's drain are counted apart, not as failures
            if f["by_design"] and f["phase"] in counts:
                row = counts[f["phase"]]["long"]
                row["failed"] -= 1
                row["drained"] = row.get("drained", 0) + 1
        result.update(
            counts=counts,
            failures=sorted(failures, key=lambda f: f["time"]),
            slow=[s for r in reports.values() for s in r["slow"]],
            marks=scenario.marks,
            timeline=events,
            conntrack=scenario.conntrack,
        )
    finally:
        if scenario is not None:
            scenario.kill_traffic()
            scenario.stop_capture()
        result["down_problems"] = bed.down()
        result["leftovers"] = cleanup.leftovers(layout)
        result["seconds"] = round(time.monotonic() - started, 1)
        result["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m testbed.enroll_traffic",
                                description=__doc__.split("\n")[0])  # fmt: skip
    p.add_argument("--backend", choices=BACKENDS, default="iptables")
    p.add_argument("--instance", default=os.environ.get("ISTIO_CNI_TESTBED_INSTANCE") or "enroll")
    p.add_argument("--json", help="write the full result (failures, evidence, timeline) here")
    p.add_argument("--capture", help="pcap of the clients' TCP packets (FILE, FILE.cli-1)")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("enroll_traffic: needs root (the testbed): run it with sudo", file=sys.stderr)
        return 2
    try:
        result = run(args.backend, args.instance, args.capture)
    except ScenarioError as e:
        print(f"enroll_traffic: {e}", file=sys.stderr)
        return 1
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    print(f"backend {args.backend}, {result['seconds']}s, load {result['loadavg']}")
    print(table(result))
    for variant, counters in result.get("bpf_counters", {}).items():
        print(f"ebpf counters {variant}: " + ", ".join(f"{k}={v}" for k, v in counters.items()))
    for f in result.get("failures", []):
        tag = " (drained by ztunnel)" if f["by_design"] else ""
        print(f"  {f['phase']}: {f['client']} -> {f['target_pod']} {f['kind']}: {f['error']}{tag}")
        for line in f["evidence"]:
            print(f"      {line}")
    failed = sum(r[k]["failed"] for r in result.get("counts", {}).values() for k in ("new", "long"))
    return 0 if failed == 0 and not result["down_problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
