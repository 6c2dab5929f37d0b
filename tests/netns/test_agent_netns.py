"""The whole agent on the real kernel: real pod namespaces, the real iptables backend, the
real ZDS server (a recording ztunnel on its socket), the real host-probe ipset + SNAT rule in
a throwaway "node" namespace, the real plugin-event socket. Only the Kubernetes API is the
in-memory fake (tests/agent_fakes.py); the testbed tests run the same agent against a real
API server. /proc discovery reads a staged proc tree whose ``ns/net`` entries are the real
namespaces (tests/netns/test_netns_finder_real.py covers real processes in real cgroups)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cni_plugin import constants as c
from cni_plugin.redirection.registry import make_backend
from cni_plugin.redirection.settings import RedirectSettings
from node_agent.agent_assembly import Agent
from node_agent.host_probe import HostProbe
from tests.agent_fakes import FakeKube, make_pod, wait_for
from tests.throwaway_node import agent_config, own_namespaces
from tests.time_scale import scaled
from tests.zds_recorder import ZdsRecorder

pytestmark = pytest.mark.netns
AMBIENT = {c.DATAPLANE_MODE_LABEL: c.DATAPLANE_MODE_AMBIENT}
SETTINGS = RedirectSettings(dns_capture=False, ipv6=True)


@dataclass
class StagedPod:
    uid: str
    name: str
    netns: str  # /run/netns/<name>
    ip: str
    pid: int


class Env:
    def __init__(self, tmp: Path, make_netns: Callable[[str], str]) -> None:
        self.tmp = tmp
        self.make_netns = make_netns
        self.proc = tmp / "proc"
        self.proc.mkdir()
        self.kube = FakeKube()
        self.node_netns = "/run/netns/" + make_netns("node")
        self.backend = make_backend("iptables")
        self.pods: dict[str, StagedPod] = {}
        self.next_pid = 100
        self.agent: Agent | None = None
        self.recorder: ZdsRecorder | None = None
        self.cfg = agent_config(tmp, self.node_netns)  # its proc_root is self.proc
        self.probe = HostProbe(ipv6=True, node_netns=self.node_netns)

    # -- staging ------------------------------------------------------------------------
    def _proc_entry(self, pid: int, netns: str, uid: str, start: int) -> None:
        d = self.proc / str(pid)
        (d / "ns").mkdir(parents=True)
        os.symlink(netns, d / "ns" / "net")
        (d / "cgroup").write_text(f"4:pids:/kubepods/besteffort/pod{uid}/pause\n")
        fields = ["S"] + ["0"] * 50
        fields[19] = str(start)
        (d / "stat").write_text(f"{pid} (pause) " + " ".join(fields) + "\n")

    def stage(self, ns: str, name: str, **kw: Any) -> StagedPod:
        uid = str(uuid.uuid4())
        netns = "/run/netns/" + self.make_netns("pod")
        n = len(self.pods) + 1
        ip = kw.pop("ip", f"10.99.{n // 250}.{n % 250 + 2}")
        self.next_pid += 1
        self._proc_entry(self.next_pid, netns, uid, self.next_pid)
        pod = StagedPod(uid, name, netns, ip or "", self.next_pid)
        self.pods[uid] = pod
        self.kube.put_pod(make_pod(ns, name, uid=uid, ip=ip, **kw))
        return pod

    def replace_netns(self, pod: StagedPod) -> str:
        """The sandbox re-created under the same UID: old process gone, new namespace."""
        subprocess.run(["rm", "-rf", str(self.proc / str(pod.pid))], check=True)
        pod.netns = "/run/netns/" + self.make_netns("pod2")
        self.next_pid += 1
        pod.pid = self.next_pid
        self._proc_entry(pod.pid, pod.netns, pod.uid, pod.pid)
        return pod.netns

    # -- agent ----------------------------------------------------------------------------
    def start_agent(self) -> Agent:
        self.agent = Agent(self.cfg, kube=self.kube, rules=self.backend)
        self.agent.start(sync_timeout=scaled(10))
        return self.agent

    def stop_agent(self) -> None:
        if self.agent is not None:
            self.agent.stop()
            self.agent = None

    def close(self) -> None:
        """Everything a test may have started: the agent, the ZDS peer, the host probe."""
        self.stop_agent()
        if self.recorder is not None:
            self.recorder.stop()
        self.probe.teardown()

    def start_ztunnel(self) -> ZdsRecorder:
        self.recorder = ZdsRecorder(self.cfg.ztunnel_socket)
        self.recorder.start()
        return self.recorder

    def rules_ok(self, pod: StagedPod) -> bool:
        return self.backend.check(pod.netns, SETTINGS).ok

    def enrolled(self, pod: StagedPod) -> bool:
        return self.kube.annotation(pod.uid) == c.REDIRECTION_ENABLED


@pytest.fixture
def own_netns() -> Iterator[Callable[[str], str]]:
    """Throwaway namespaces under a prefix of this module's own (``icnia-``), removed at
    teardown: the shared ``icnit-`` sweep of a concurrent pytest session must not pull
    namespaces out from under a running agent."""
    with own_namespaces("icnia") as make:
        yield make


@pytest.fixture
def env(tmp_path: Path, own_netns: Callable[[str], str]) -> Iterator[Env]:
    e = Env(tmp_path, own_netns)
    try:
        yield e
    finally:
        e.close()


def _post(sock: str, path: str, body: dict[str, Any]) -> tuple[int, str]:
    class Conn(http.client.HTTPConnection):
        def connect(self) -> None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(30)
            s.connect(sock)
            self.sock = s

    conn = Conn("localhost", timeout=30)
    try:
        conn.request("POST", path, body=json.dumps(body))
        r = conn.getresponse()
        return r.status, r.read().decode()
    finally:
        conn.close()


def test_label_enrolls_unlabel_removes_and_skips_are_never_touched(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    env.kube.put_namespace("shop")
    env.kube.put_namespace("kube-system", AMBIENT)  # excluded even when labelled
    pods = [env.stage("shop", f"web-{i}") for i in range(5)]
    skipped = [
        env.stage("shop", "opted-out", labels={c.DATAPLANE_MODE_LABEL: "none"}),
        env.stage("shop", "sidecar", annotations={c.SIDECAR_STATUS_ANNOTATION: "{}"}),
        env.stage("shop", "hostnet", host_network=True),
        env.stage("kube-system", "dns"),
    ]
    zt = env.start_ztunnel()
    agent = env.start_agent()
    wait_for(lambda: zt.of("snapshot_sent"), what="ztunnel got its (empty) snapshot")
    assert zt.of("add") == []

    env.kube.put_namespace("shop", AMBIENT)
    wait_for(lambda: all(env.enrolled(p) for p in pods), what="all pods annotated enabled")
    for p in pods:
        assert env.rules_ok(p), f"rules missing in {p.name}"
    adds = {s.uid: s.inode for s in zt.of("add")}
    assert adds == {p.uid: os.stat(p.netns).st_ino for p in pods}
    assert len(zt.of("add")) == len(pods)  # one enrolment per pod, not one per event
    members = env.probe.members()
    assert {ip: uid for ip, uid in members.items()} == {p.ip: p.uid for p in pods}
    saved = subprocess.run(
        ["nsenter", f"--net={env.node_netns}", "iptables-save", "-t", "nat"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--match-set istio-inpod-probes-v4 dst -j SNAT --to-source 169.254.7.127" in saved
    for p in skipped:
        assert env.kube.annotation(p.uid) is None
        assert env.backend.check(p.netns, SETTINGS).missing, f"{p.name} was touched"
    assert not any(name in (p.name for p in skipped) for _, name, _ in env.kube.patches)

    # Status commands read the agent's state over the run dir.
    agent.state.write_now()
    from node_agent import pods_command

    doc = pods_command.load(env.cfg.run_dir)
    table = pods_command.table(doc)
    assert "web-0" in table and "HBONE" in table and "iptables" in table
    assert all(
        ("HBONE" in line) == line.split()[1].startswith("web-") for line in table.splitlines()[1:]
    )
    from node_agent.cli import main as cli_main

    web0 = pods[0]
    code = cli_main(["pod", "shop/web-0", "--run-dir", env.cfg.run_dir])
    out = capsys.readouterr().out
    assert code == 0
    assert f"UID:           {web0.uid}" in out
    assert f"Netns inode:   {os.stat(web0.netns).st_ino}" in out
    assert "State:         enabled" in out and "ZDS:           acked" in out
    assert "-j REDIRECT --to-ports 15001" in out  # the rules its backend installs
    assert cli_main(["pod", "shop/nope", "--run-dir", env.cfg.run_dir]) == 1

    env.kube.put_namespace("shop")
    wait_for(lambda: all(env.kube.annotation(p.uid) is None for p in pods), what="annotations null")
    wait_for(lambda: len(zt.of("del")) == len(pods), what="Del per pod")
    for p in pods:
        assert env.backend.check(p.netns, SETTINGS).missing, f"rules left in {p.name}"
    assert env.probe.members() == {}
    assert len(agent.cache) == 0


def test_delete_sends_del_and_restart_keeps_rules_and_resends_snapshot(env: Env) -> None:
    env.kube.put_namespace("shop", AMBIENT)
    pods = [env.stage("shop", f"api-{i}") for i in range(4)]
    zt = env.start_ztunnel()
    env.start_agent()
    wait_for(lambda: all(env.enrolled(p) for p in pods), what="enrolled")

    gone = pods.pop()
    env.kube.delete_pod(gone.uid)
    wait_for(lambda: [s.uid for s in zt.of("del")] == [gone.uid], what="Del for the deleted pod")

    # Rules must hold at every moment while the agent is down and back up.
    lost: list[str] = []
    stop = threading.Event()

    def watch_rules() -> None:
        while not stop.is_set():
            lost.extend(p.name for p in pods if not env.rules_ok(p))

    t = threading.Thread(target=watch_rules)
    t.start()
    try:
        env.stop_agent()
        before = len(zt.of("add"))
        env.start_agent()
        wait_for(
            lambda: zt.connections >= 2 and len(zt.of("snapshot_sent")) >= 2, what="resnapshot"
        )
    finally:
        stop.set()
        t.join()
    assert lost == []
    snap = [s for s in zt.seen if s.connection == zt.connections and s.kind == "add"]
    assert {s.uid: s.inode for s in snap} == {p.uid: os.stat(p.netns).st_ino for p in pods}
    assert len(zt.of("add")) == before + len(pods)
    assert all(env.enrolled(p) for p in pods)


def test_drift_repair_rules_removed_and_netns_replaced(env: Env) -> None:
    env.kube.put_namespace("shop", AMBIENT)
    a, b = env.stage("shop", "a"), env.stage("shop", "b")
    zt = env.start_ztunnel()
    agent = env.start_agent()
    wait_for(lambda: env.enrolled(a) and env.enrolled(b), what="enrolled")

    env.backend.remove(a.netns, SETTINGS)  # someone flushed the pod's rules
    assert not env.rules_ok(a)
    old_inode = os.stat(b.netns).st_ino
    new_ns = env.replace_netns(b)
    report = agent.reconciler.run_pass()
    assert report.rules_repaired == [a.uid]
    assert report.netns_replaced == [b.uid]
    assert env.rules_ok(a) and env.rules_ok(b)
    new_inode = os.stat(new_ns).st_ino
    assert new_inode != old_inode
    assert zt.of("add")[-1].uid == b.uid and zt.of("add")[-1].inode == new_inode
    assert agent.cache.get(b.uid) is not None and agent.cache.get(b.uid).netns_inode == new_inode  # type: ignore[union-attr]
    # A second pass finds nothing to do.
    again = agent.reconciler.run_pass()
    assert again.rules_repaired == [] and again.netns_replaced == [] and again.checked == 2


def test_ztunnel_absent_marks_pending_then_enables(env: Env) -> None:
    env.kube.put_namespace("shop", AMBIENT)
    p = env.stage("shop", "late")
    env.start_agent()
    wait_for(lambda: env.kube.annotation(p.uid) == c.REDIRECTION_PENDING, what="pending")
    assert env.rules_ok(p)  # rules went in first
    zt = env.start_ztunnel()
    wait_for(lambda: env.enrolled(p), what="enabled once ztunnel is there")
    assert p.uid in {s.uid for s in zt.of("add")}


def test_plugin_cmdadd_enrolls_before_reply_and_410_relists(env: Env) -> None:
    env.kube.put_namespace("shop", AMBIENT)
    zt = env.start_ztunnel()
    agent = env.start_agent()
    wait_for(lambda: zt.of("snapshot_sent"), what="ztunnel connected")
    # A new sandbox: the pod has no IP in the API yet; the plugin reports the IP.
    pod = env.stage("shop", "fresh", ip=None)
    # The primary CNI configured the IP in the namespace before our plugin runs.
    name = pod.netns.removeprefix("/run/netns/")
    subprocess.run(["ip", "-n", name, "addr", "add", "10.98.0.7/24", "dev", "lo"], check=True)
    body = {
        "Netns": pod.netns.replace("/run/netns/", "/var/run/netns/"),
        "PodName": "fresh",
        "PodNamespace": "shop",
        "IPs": [
            {
                "Interface": 0,
                "Address": {"IP": "10.98.0.7", "Mask": "////AA=="},
                "Gateway": "10.98.0.1",
            }
        ],
    }
    code, text = _post(env.cfg.plugin_event_socket, "/cmdadd", body)
    assert (code, text) == (200, "enrolled")
    assert env.rules_ok(pod) and env.enrolled(pod)  # done before the reply
    assert env.probe.members().get("10.98.0.7") == pod.uid
    assert zt.of("add")[-1].inode == os.stat(pod.netns).st_ino
    code, text = _post(env.cfg.plugin_event_socket, "/cmdadd", {**body, "PodName": ""})
    assert code == 400

    # The watch expires while a delete is missed: the relist must still deliver it.
    with env.kube._lock:
        env.kube.pods.pop(pod.uid)
    env.kube.expire_next_watch = True
    env.kube.drop_watches()
    wait_for(lambda: pod.uid in {s.uid for s in zt.of("del")}, what="Del after relist")
    assert agent.pod_informer.relists >= 2


def _get(port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read().decode()
    finally:
        conn.close()


def test_health_readiness_and_metrics(env: Env) -> None:
    # Not ready while the API cannot be listed (cache never syncs): /readyz 503, /healthz 200,
    # and the start keeps trying (fail closed) until it is stopped.
    env.kube.fail_lists = 10_000
    agent = Agent(env.cfg, kube=env.kube, rules=env.backend, is_upgrade=lambda: True)
    errors: list[BaseException] = []
    cancel = threading.Event()

    def start() -> None:
        try:
            agent.start(sync_timeout=0.5, cancel=cancel)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=start)
    t.start()
    wait_for(lambda: agent.health_port != 0, what="health server up")
    assert _get(agent.health_port, "/healthz") == (200, "ok")
    assert _get(agent.health_port, "/readyz")[0] == 503
    cancel.set()
    t.join()
    assert not errors
    agent.stop()

    env.kube.fail_lists = 0
    env.kube.put_namespace("shop", AMBIENT)
    p = env.stage("shop", "m")
    zt = env.start_ztunnel()
    agent = env.start_agent()
    wait_for(lambda: env.enrolled(p), what="enrolled")
    wait_for(lambda: zt.of("snapshot_sent"), what="ztunnel connected")
    assert _get(agent.health_port, "/readyz") == (200, "ready")
    _post(env.cfg.plugin_event_socket, "/cmdadd", {"PodName": ""})  # a 400, counted
    agent.state.write_now()  # also syncs the install gauge
    code, text = _get(agent.metrics_port, "/metrics")
    assert code == 200
    for line in (
        "istio_cni_install_ready 1.0",
        "ztunnel_connected 1.0",
        'istio_cni_plugin_requests_total{response_code="400"} 1.0',
        "nodeagent_enrollment_duration_seconds_count 1.0",
        "process_resident_memory_bytes",
    ):
        assert line in text, f"{line!r} not in metrics"
    assert 'nodeagent_reconcile_events_total{type="add"}' in text
    assert "istio_cni_installs_total" in text


def test_bypass_inbound_annotation_selects_and_switches_the_ingress_variant(env: Env) -> None:
    env.kube.put_namespace("shop", AMBIENT)
    p = env.stage("shop", "gw", annotations={c.BYPASS_INBOUND_ANNOTATION: "true"})
    env.start_ztunnel()
    env.start_agent()
    ingress = RedirectSettings(dns_capture=False, ipv6=True, bypass_inbound=True)
    wait_for(lambda: env.enrolled(p), what="enrolled")
    assert env.backend.check(p.netns, ingress).ok  # no inbound capture
    pod = env.kube.pod(p.uid)
    pod["metadata"]["annotations"].pop(c.BYPASS_INBOUND_ANNOTATION)
    env.kube.put_pod(pod)
    wait_for(lambda: env.rules_ok(p), what="default variant after the annotation went away")
    assert not env.backend.check(p.netns, ingress).ok


def _cmdadd(netns: str, name: str, ips: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "Netns": netns,
        "PodName": name,
        "PodNamespace": "shop",
        "IPs": [{"Interface": 0, "Address": {"IP": ip, "Mask": "////AA=="}} for ip in ips],
    }


def test_plugin_cmdadd_refuses_what_is_not_the_named_pods(env: Env) -> None:
    """Issue 14.4: a FIFO (would block an open), the agent's own namespace, another pod's,
    a pod of another node, IPs the namespace does not hold: each a 400 with its reason,
    nothing enrolled; the pod's own namespace and IP are still enrolled after."""
    env.kube.put_namespace("shop", AMBIENT)
    zt = env.start_ztunnel()
    env.start_agent()
    wait_for(lambda: zt.of("snapshot_sent"), what="ztunnel connected")
    other = env.stage("shop", "other", labels={c.DATAPLANE_MODE_LABEL: c.DATAPLANE_MODE_NONE})
    new = env.stage("shop", "new", ip=None)
    env.kube.put_pod(make_pod("shop", "far", node="node-2"))
    own = new.netns.removeprefix("/run/netns/")
    subprocess.run(["ip", "-n", own, "addr", "add", "10.98.1.9/24", "dev", "lo"], check=True)
    fifo = str(env.tmp / "fifo")
    os.mkfifo(fifo)
    # /proc/<pid>/ns/net paths are read under the agent's proc root: stage one that is the
    # agent's own namespace (no pod cgroup).
    (env.proc / "7" / "ns").mkdir(parents=True)
    os.symlink(f"/proc/{os.getpid()}/ns/net", env.proc / "7" / "ns" / "net")
    sock = env.cfg.plugin_event_socket
    cases = {
        "fifo": (_cmdadd(fifo, "new"), "FIFO or device"),
        "agent's own": (_cmdadd("/proc/7/ns/net", "new"), "own network namespace"),
        "another pod's": (_cmdadd(other.netns, "new"), f"pod uid {other.uid}"),
        "other node": (_cmdadd(new.netns, "far"), "not on this node"),
        "foreign ip": (_cmdadd(new.netns, "new", ("10.98.1.10",)), "not assigned in"),
    }
    for what, (body, reason) in cases.items():
        code, text = _post(sock, "/cmdadd", body)
        assert code == 400 and reason in text and "\n" not in text.strip(), (what, text)
    assert not zt.of("add") and not env.probe.members() and not env.enrolled(new)
    assert not env.rules_ok(new) and not env.rules_ok(other)
    # Issue 14.3: the pod's real ADD succeeds while 150 hostile connections (over the cap
    # of 64) are held open: idle, headers never finished, bodies shorter than announced.
    hostile = []
    try:
        for i in range(150):
            h = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            h.settimeout(5)
            h.connect(sock)
            h.sendall([b"", b"POST /cmdadd HTTP/1.1\r\n", b"POST /cmdadd HTTP/1.1\r\n"
                       b"Content-Length: 900\r\n\r\n{"][i % 3])  # fmt: skip
            hostile.append(h)
        code, text = _post(sock, "/cmdadd", _cmdadd(new.netns, "new", ("10.98.1.9",)))
    finally:
        for h in hostile:
            h.close()
    assert (code, text) == (200, "enrolled")
    assert env.probe.members() == {"10.98.1.9": new.uid}
    assert zt.of("add")[-1].inode == os.stat(new.netns).st_ino
