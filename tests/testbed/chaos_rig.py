"""The rig of the fault tests (issue 14, "Faults survived"): the node agent and the ztunnel
stand-in on the real testbed node (:mod:`tests.testbed.agent_on_node`), many light pods
(:mod:`bench.agent_light_pods`) as the load, and traffic the whole time.

Traffic: three light pods of namespace ``icnia-chaos-t-<tag>`` (ambient) get a real link:
a veth each to a bridge in a namespace of the rig's own (``icnia-chaos-br-<tag>``).
``srv-0`` and ``srv-1`` run a server (HTTP on 8080 naming the server, a line echo on 9000);
:mod:`testbed.traffic` runs in ``cli-0`` (enrolled: traffic *between* enrolled pods, through
both pods' redirection and the stand-in's 15001 and 15006) and in the bridge namespace (not
enrolled: traffic *to* enrolled pods, through the servers' 15006), against both servers:
new connections back to back and long-lived ones, every failure counted per phase.

Observations are the kernel's and the peers' own: annotations from the API server, the
agent's state file and log, the stand-in's log (``proxy started`` with the netns inode it
got, ``snapshot complete`` with what a ZDS connection's snapshot held), and the rules read
back from every pod's namespace with ``iptables-save``. :meth:`ChaosRig.cleanup` removes
every piece (processes, links, namespaces, API objects), also after a failure; with
``ICNI_CHAOS_LOGS=DIR`` it first copies the agent's and the stand-in's logs to ``DIR/<tag>``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.agent_light_pods import LightNode, LightPod
from cni_plugin import constants as c
from cni_plugin.redirection.registry import make_backend
from cni_plugin.redirection.settings import RedirectSettings
from testbed.demo_cluster import json_records
from testbed.node import Testbed
from tests.testbed.agent_on_node import REPO, NodeAgent, wait

AMBIENT = {c.DATAPLANE_MODE_LABEL: c.DATAPLANE_MODE_AMBIENT}
SETTINGS = RedirectSettings(dns_capture=False, ipv6=True)
OUTSIDE_IP = "10.201.0.1"  # the un-enrolled client on the bridge
TRAFFIC_ARGS = ["--interval", "0.2", "--ping", "0.2", "--max-seconds", "3600"]

# One server process per pod: HTTP/1.0 on 8080 answering its name, a line echo on 9000.
SERVER = r"""
import socket, sys, threading
NAME = sys.argv[1].encode() + b"\n"
def http(c):
    with c:
        c.settimeout(10)
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = c.recv(4096)
                if not chunk:
                    return
                data += chunk
            c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(NAME), NAME))
        except OSError:
            pass
def echo(c):
    with c:
        try:
            for line in c.makefile("rb"):
                c.sendall(line)
        except OSError:
            pass
def serve(port, handler):
    s = socket.create_server(("0.0.0.0", port), backlog=256)
    while True:
        conn, _ = s.accept()
        threading.Thread(target=handler, args=(conn,), daemon=True).start()
threading.Thread(target=serve, args=(8080, http), daemon=True).start()
serve(9000, echo)
"""


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def records(text: str) -> list[dict[str, Any]]:
    return json_records(text.splitlines())


class ChaosRig:
    def __init__(self, bed: Testbed, info: dict[str, Any], core: Any, **agent_env: str) -> None:
        self.core = core
        self.ln = LightNode(core)
        self.agent = NodeAgent(bed, info, node_name=self.ln.node_name)
        self.agent.env.update(agent_env)
        self.backend = make_backend("iptables")
        self.tag = self.ln.tag
        self.bridge_ns = f"icnia-chaos-br-{self.tag}"
        self.traffic_ns = f"icnia-chaos-t-{self.tag}"
        self.bulk_ns = f"icnia-chaos-b-{self.tag}"
        self.traffic_pods: list[LightPod] = []
        self.bulk: list[LightPod] = []
        self._servers: list[subprocess.Popen[bytes]] = []
        self._clients: list[subprocess.Popen[str]] = []
        self._bridge = False

    # -- building ----------------------------------------------------------------------
    def create(self) -> None:
        self.ln.create_node()
        _ip("netns", "add", self.bridge_ns)
        self._bridge = True
        _ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        _ip("-n", self.bridge_ns, "addr", "add", f"{OUTSIDE_IP}/32", "dev", "br0")
        _ip("-n", self.bridge_ns, "route", "add", "10.200.0.0/16", "dev", "br0")
        self.ln.create_namespace(self.traffic_ns, dict(AMBIENT))
        for i, name in enumerate(["srv-0", "srv-1", "cli-0"]):
            pod = self.ln.add_pod(self.traffic_ns, name)
            self._wire(pod, i)
            self.traffic_pods.append(pod)
        for pod in self.traffic_pods[:2]:
            self._servers.append(
                subprocess.Popen(
                    ["nsenter", f"--net={pod.netns}", sys.executable, "-c", SERVER, pod.name]
                )
            )

    def _wire(self, pod: LightPod, i: int) -> None:
        ns = os.path.basename(pod.netns)
        _ip("-n", self.bridge_ns, "link", "add", f"vp{i}", "type", "veth", "peer", "name",
            "eth0", "netns", ns)  # fmt: skip
        _ip("-n", self.bridge_ns, "link", "set", f"vp{i}", "master", "br0", "up")
        # The address moves from lo to eth0, as a real pod has it: REDIRECT (inbound to 15006)
        # rewrites to the incoming interface's address and drops when it has none.
        _ip("-n", ns, "addr", "del", f"{pod.ip}/32", "dev", "lo")
        _ip("-n", ns, "addr", "add", f"{pod.ip}/32", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "route", "add", "10.200.0.0/15", "dev", "eth0", "src", pod.ip)

    def add_bulk(self, n: int, labelled: bool) -> list[LightPod]:
        """``n`` running light pods in the bulk namespace (created unlabelled or ambient)."""
        self.ln.create_namespace(self.bulk_ns, dict(AMBIENT) if labelled else None)
        self.bulk = [self.ln.add_pod(self.bulk_ns, f"p-{i}") for i in range(n)]
        return self.bulk

    @property
    def pods(self) -> list[LightPod]:
        return self.traffic_pods + self.bulk

    def start_mesh(self) -> None:
        """Stand-in and agent up, the traffic pods enrolled and held by the stand-in."""
        self.agent.start_standin()
        self.agent.start()
        wait(self.agent.ready, 120, "agent ready with ztunnel connected", self.agent)
        wait(
            lambda: self.enabled(self.traffic_pods) and self.inodes_held(self.traffic_pods),
            120, "traffic pods enrolled", self.agent,
        )  # fmt: skip

    # -- traffic -----------------------------------------------------------------------
    def start_traffic(self, phase: str) -> None:
        targets = [f"{p.ip}={p.name}" for p in self.traffic_pods[:2]]
        cli = self.traffic_pods[2].netns
        for netns in (cli, f"/run/netns/{self.bridge_ns}"):
            self._clients.append(
                subprocess.Popen(
                    [
                        "nsenter",
                        f"--net={netns}",
                        sys.executable,
                        "-m",
                        "testbed.traffic",
                        *targets,
                        *TRAFFIC_ARGS,
                        "--phase",
                        phase,
                    ],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    cwd=str(REPO),
                    env={**os.environ, "PYTHONPATH": str(REPO)},
                )
            )

    def phase(self, name: str) -> None:
        for proc in self._clients:
            assert proc.stdin is not None
            proc.stdin.write(f"phase {name}\n")
            proc.stdin.flush()

    def stop_traffic(self) -> dict[str, Any]:
        """Every phase's requests/pings sent and failed, both clients summed, and failures."""
        phases: dict[str, dict[str, int]] = {}
        failures: list[dict[str, Any]] = []
        for proc, who in zip(self._clients, ["cli-0", "outside"], strict=True):
            out, _ = proc.communicate("stop\n", timeout=60)
            rep = json.loads(out)
            for name, kinds in rep["phases"].items():
                tally = phases.setdefault(name, Counter())
                for kind, label in (("new", "requests"), ("long", "pings")):
                    tally[f"{label}_sent"] += kinds[kind]["sent"]
                    tally[f"{label}_failed"] += kinds[kind]["failed"]
            failures += [{**f, "client": who} for f in rep["failures"]]
        self._clients = []
        return {"phases": {k: dict(v) for k, v in phases.items()}, "failures": failures}

    @staticmethod
    def failure_summary(traffic: dict[str, Any]) -> dict[str, int]:
        """(client, phase, kind, target, error) -> count: the failures in one readable line."""
        keys = [
            f"{f['client']} {f['phase']} {f['kind']} {f['target']}: {f['error']}"
            for f in traffic["failures"]
        ]
        return dict(Counter(keys))

    # -- observations -----------------------------------------------------------------
    def annotations(self) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for ns in (self.traffic_ns, self.bulk_ns):
            if ns in self.ln.namespaces:
                out.update(self.ln.annotations(ns))
        return out

    def enabled(self, pods: list[LightPod]) -> bool:
        ann = self.annotations()
        return all(ann.get(p.uid) == c.REDIRECTION_ENABLED for p in pods)

    def expected_inodes(self, pods: list[LightPod] | None = None) -> dict[str, int]:
        return {p.uid: os.stat(p.netns).st_ino for p in (self.pods if pods is None else pods)}

    def standin_table(self, run: int | None = None) -> dict[str, int]:
        """uid -> netns inode of every proxy the stand-in (run ``run``, default the latest)
        holds now, from its log: started (or re-added), minus stopped."""
        run = run or self.agent.standin_starts
        table: dict[str, int] = {}
        text = self.agent._standin_log(run).read_text(errors="replace")
        for rec in records(text):
            if rec.get("msg") in ("proxy started", "add for a known netns: no-op"):
                table[rec["uid"]] = rec["netns_inode"]
            elif rec.get("msg") in ("proxy stopped",):
                table.pop(rec["uid"], None)
        return table

    def inodes_held(self, pods: list[LightPod]) -> bool:
        table = self.standin_table()
        return all(table.get(u) == i for u, i in self.expected_inodes(pods).items())

    def standin_adds(self, run: int | None = None) -> Counter[str]:
        """ZDS Adds the stand-in got per uid (new proxies and no-op re-adds), all runs."""
        adds: Counter[str] = Counter()
        for msg in ("proxy started", "add for a known netns: no-op"):
            adds.update(e["uid"] for e in self.agent.standin_events(msg, run))
        return adds

    def agent_records(self, msg: str) -> list[dict[str, Any]]:
        return [r for r in records(self.agent.agent_log(None)) if r.get("msg") == msg]

    def pod_story(self, uid: str) -> list[str]:
        """The agent's and the stand-in's log lines about one pod (a failure's evidence)."""
        lines = [
            f"agent {r.get('time')} {r.get('msg')} {r.get('error', '')}"
            for r in records(self.agent.agent_log(None))
            if uid in json.dumps(r)
        ]
        for run in range(1, self.agent.standin_starts + 1):
            text = self.agent._standin_log(run).read_text(errors="replace")
            lines += [f"standin-{run} {r.get('time')} {r.get('msg')}" for r in records(text)
                      if uid in json.dumps(r)]  # fmt: skip
        return lines

    def enrolled_logged(self, namespace: str) -> int:
        """Pods of ``namespace`` the agents logged as enrolled (each run's log)."""
        text = self.agent.agent_log(None)
        return sum(
            1
            for r in records(text)
            if r.get("msg") == "pod enrolled" and r.get("pod", {}).get("namespace") == namespace
        )

    def rule_problems(self, pods: list[LightPod] | None = None) -> list[str]:
        """Every pod's rules complete (backend ``check``) and present exactly once: no rule
        line twice in ``iptables-save`` of either variant, and our chains in one variant."""
        problems: list[str] = []
        for p in self.pods if pods is None else pods:
            rep = self.backend.check(p.netns, SETTINGS)
            if not rep.ok:
                problems.append(f"{p.name}: missing={rep.missing} extra={rep.extra}")
            holders = 0
            for tool in ("iptables-legacy-save", "iptables-nft-save",
                         "ip6tables-legacy-save", "ip6tables-nft-save"):  # fmt: skip
                out = subprocess.run(
                    ["nsenter", f"--net={p.netns}", tool], capture_output=True, text=True
                ).stdout
                rules, table = [], ""
                for line in out.splitlines():
                    if line.startswith("*"):
                        table = line[1:]
                    elif line.startswith("-A "):
                        rules.append(f"{table} {line}")  # the same chain name in many tables
                twice = [r for r, k in Counter(rules).items() if k > 1]
                if twice:
                    problems.append(f"{p.name}: {tool}: rules twice: {twice[:3]}")
                if tool.startswith("iptables") and any("ISTIO" in r for r in rules):
                    holders += 1
            if holders != 1:
                problems.append(f"{p.name}: our IPv4 chains in {holders} iptables variants")
        return problems

    def state_problems(self) -> list[str]:
        """The agent's own record: every pod enabled, with its netns inode, and no other."""
        st = self.agent.state()
        got = {p["uid"]: p for p in st.get("pods", []) if p.get("state") == "enabled"}
        want = self.expected_inodes()
        problems = [f"{u}: not enabled in the agent's state" for u in want if u not in got]
        problems += [f"{u}: enabled but not a pod of the rig" for u in got if u not in want]
        problems += [
            f"{u}: agent has netns inode {got[u]['netns_inode']}, the pod {i}"
            for u, i in want.items()
            if u in got and got[u]["netns_inode"] != i
        ]
        return problems

    # -- the API server -----------------------------------------------------------------
    @staticmethod
    def freeze(pid: int, seconds: float, during: Any = None) -> float:
        """SIGSTOP the process for ``seconds`` (an outage: connections hang, nothing
        answers), calling ``during()`` meanwhile; always SIGCONT. Returns the real length."""
        t0 = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        try:
            while time.monotonic() - t0 < seconds:
                if during is not None:
                    during()
                time.sleep(0.5)
        finally:
            os.kill(pid, signal.SIGCONT)
        return time.monotonic() - t0

    # -- teardown -----------------------------------------------------------------------
    def cleanup(self) -> list[str]:
        for proc in self._clients:
            with contextlib.suppress(Exception):
                proc.kill()
                proc.communicate(timeout=10)
        keep = os.environ.get("ICNI_CHAOS_LOGS")  # a directory: the logs are copied there
        if keep:
            self.agent.stop()
            shutil.copytree(self.agent.dir, Path(keep) / self.tag, dirs_exist_ok=True)
        self.agent.cleanup()
        for srv in self._servers:
            srv.kill()
            srv.wait()
        problems = self.ln.cleanup()
        if self._bridge:
            r = subprocess.run(["ip", "netns", "del", self.bridge_ns], capture_output=True)
            if r.returncode != 0:
                problems.append(f"netns {self.bridge_ns}: {r.stderr.decode().strip()}")
        return problems
