"""The node agent with kubelet pods on the real testbed: running pods enrolled without a
restart when their namespace is labelled, real traffic between two of them through the
ztunnel stand-in, removal on unlabel, skips, and a SIGKILL restart of the agent while a
traffic loop runs (every connection must still go through the stand-in)."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from cni_plugin import constants as c
from cni_plugin.netns import run_in_netns
from cni_plugin.redirection.registry import make_backend
from cni_plugin.redirection.settings import RedirectSettings
from node_agent.netns_finder import NetnsFinder
from testbed.node import Testbed
from tests.testbed.agent_on_node import NodeAgent, wait

pytestmark = pytest.mark.testbed
AMBIENT = {c.DATAPLANE_MODE_LABEL: c.DATAPLANE_MODE_AMBIENT}
SETTINGS = RedirectSettings(dns_capture=False, ipv6=True)
BACKEND = make_backend("iptables")
PORT = 8080


class Pods:
    def __init__(self, core: Any, namespace: str, info: dict[str, Any]) -> None:
        self.core, self.ns, self.info = core, namespace, info
        self.finder = NetnsFinder("/proc", host_netns=info["node_netns"])

    def create(
        self,
        name: str,
        *,
        image: str = "httpd",
        labels: dict[str, str] | None = None,
        annotations: dict[str, str] | None = None,
        host_network: bool = False,
    ) -> None:
        spec: dict[str, Any] = {
            "terminationGracePeriodSeconds": 0,
            "hostNetwork": host_network,
            "containers": [
                {"name": "app", "image": self.info["images"][image], "imagePullPolicy": "Never",
                 "env": [{"name": "PORT", "value": str(PORT)}]}
            ],
        }  # fmt: skip
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "labels": labels or {}, "annotations": annotations or {}},
            "spec": spec,
        }
        self.core.create_namespaced_pod(self.ns, body)

    def all(self) -> dict[str, Any]:
        return {p.metadata.name: p for p in self.core.list_namespaced_pod(self.ns).items}

    def running(self, names: list[str]) -> bool:
        pods = self.all()
        return all(
            n in pods and pods[n].status.phase == "Running" and pods[n].status.pod_ip for n in names
        )

    def ann(self, name: str) -> str | None:
        p = self.core.read_namespaced_pod(name, self.ns)
        value: str | None = (p.metadata.annotations or {}).get(c.REDIRECTION_ANNOTATION)
        return value

    def netns(self, name: str) -> str:
        uid = self.all()[name].metadata.uid
        found = self.finder.find(uid)
        assert found is not None, f"no process of pod {name} under /proc"
        return found.path

    def label(self, labels: dict[str, str | None]) -> None:
        self.core.patch_namespace(self.ns, {"metadata": {"labels": labels}})


def http_get(netns: str, ip: str) -> bool:
    """One HTTP GET from inside ``netns`` to ip:PORT; True when a 200 came back."""

    def work() -> bool:
        with socket.create_connection((ip, PORT), timeout=5) as s:
            s.sendall(f"GET / HTTP/1.0\r\nHost: {ip}\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        return data.startswith(b"HTTP/1.") and b" 200 " in data.split(b"\r\n", 1)[0]

    return run_in_netns(netns, work)


@pytest.fixture
def node_agent(testbed_node: Testbed, testbed_info: dict[str, Any]) -> Iterator[NodeAgent]:
    agent = NodeAgent(testbed_node, testbed_info)
    try:
        yield agent
    finally:
        agent.cleanup()


@pytest.fixture
def pods(kube_api: Any, kube_namespace: str, testbed_info: dict[str, Any]) -> Pods:
    from kubernetes import client

    return Pods(client.CoreV1Api(kube_api), kube_namespace, testbed_info)


def outbound_to(agent: NodeAgent, ip: str) -> list[dict[str, Any]]:
    return [
        r for r in agent.access_records()
        # As ztunnel logs it: the outbound leg goes to the peer's HBONE port, the original
        # destination is the HBONE target.
        if r.get("direction") == "outbound" and r.get("dst.hbone_addr") == f"{ip}:{PORT}"
    ]  # fmt: skip


def test_ten_running_pods_enrolled_on_label_traffic_via_standin_removed_on_unlabel(
    node_agent: NodeAgent, pods: Pods
) -> None:
    names = [f"web-{i}" for i in range(10)]
    for n in names:
        pods.create(n)
    pods.create("opted-out", labels={c.DATAPLANE_MODE_LABEL: "none"})
    pods.create("sidecar", annotations={c.SIDECAR_STATUS_ANNOTATION: "{}"})
    pods.create("hostnet", image="busybox", host_network=True)
    skipped = ["opted-out", "sidecar", "hostnet"]
    wait(lambda: pods.running(names + skipped), 180, "pods running")
    before = {n: p.status.container_statuses[0].restart_count for n, p in pods.all().items()}
    uids = {n: p.metadata.uid for n, p in pods.all().items()}
    ips = {n: p.status.pod_ip for n, p in pods.all().items()}

    node_agent.start_standin()
    node_agent.start()
    wait(node_agent.ready, 60, "agent ready", node_agent)
    assert all(pods.ann(n) is None for n in names)

    pods.label(dict(AMBIENT))
    wait(lambda: all(pods.ann(n) == "enabled" for n in names), 90, "all enabled", node_agent)
    for n in names:
        assert BACKEND.check(pods.netns(n), SETTINGS).ok, f"rules missing in {n}"
    started = {e["uid"]: e for e in node_agent.standin_events("proxy started")}
    for n in names:
        assert started[uids[n]]["ips"] == [ips[n]], f"stand-in got the wrong netns for {n}"
    for n in skipped:
        assert pods.ann(n) is None and uids[n] not in started
    for n in ("opted-out", "sidecar"):
        assert not BACKEND.check(pods.netns(n), SETTINGS).extra

    # Real traffic web-0 -> web-1 goes through the stand-in (outbound capture + HBONE).
    assert http_get(pods.netns("web-0"), ips["web-1"])
    wait(lambda: outbound_to(node_agent, ips["web-1"]), 10, "access log record")
    # Both legs logged (the inbound one may land a moment later) before counting below.
    wait(
        lambda: any(
            r.get("direction") == "inbound" and r.get("dst.addr") == f"{ips['web-1']}:{PORT}"
            for r in node_agent.access_records()
        ),
        10,
        "inbound access log record",
    )
    rec = outbound_to(node_agent, ips["web-1"])[-1]
    assert rec["src.workload"] == "web-0" and rec["dst.workload"] == "web-1"

    pods.label({c.DATAPLANE_MODE_LABEL: None})
    wait(lambda: all(pods.ann(n) is None for n in names), 90, "annotations null", node_agent)
    for n in names:
        rep = BACKEND.check(pods.netns(n), SETTINGS)
        assert rep.missing and not rep.extra, f"rules left in {n}"
    n_before = len(node_agent.access_records())
    assert http_get(pods.netns("web-0"), ips["web-1"])  # plain again: not via the stand-in
    time.sleep(0.5)
    assert len(node_agent.access_records()) == n_before
    after = {n: p.status.container_statuses[0].restart_count for n, p in pods.all().items()}
    assert after == before  # enrolled and removed without a single restart


def test_sigkill_restart_with_a_traffic_loop_never_uncaptured(
    node_agent: NodeAgent, pods: Pods
) -> None:
    pods.create("client")
    pods.create("server")
    wait(lambda: pods.running(["client", "server"]), 180, "pods running")
    server_ip = pods.all()["server"].status.pod_ip
    pods.label(dict(AMBIENT))
    node_agent.start_standin()
    node_agent.start()
    wait(lambda: pods.ann("client") == "enabled" and pods.ann("server") == "enabled", 90,
         "enrolled", node_agent)  # fmt: skip
    client_ns = pods.netns("client")
    ok = 0
    failed: list[str] = []
    stop = threading.Event()
    base = len(outbound_to(node_agent, server_ip))

    def loop() -> None:
        nonlocal ok
        while not stop.is_set():
            try:
                if http_get(client_ns, server_ip):
                    ok += 1
                else:
                    failed.append("non-200")
            except OSError as e:
                failed.append(str(e))
            time.sleep(0.02)

    t = threading.Thread(target=loop)
    t.start()
    try:
        time.sleep(1.0)
        node_agent.kill(signal.SIGKILL)
        time.sleep(1.0)  # traffic keeps flowing with no agent at all
        node_agent.start()
        wait(node_agent.ready, 60, "restarted agent ready", node_agent)
        time.sleep(1.0)
    finally:
        stop.set()
        t.join()
    assert failed == []
    assert ok > 20
    # Every connection of the loop went through the stand-in: one outbound record each.
    wait(lambda: len(outbound_to(node_agent, server_ip)) - base >= ok, 10, "records")
    assert len(outbound_to(node_agent, server_ip)) - base == ok
