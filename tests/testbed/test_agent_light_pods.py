"""The node agent on the real testbed (real kube-apiserver, official client, kubeconfig),
running in the node's namespaces as the DaemonSet would, with the ztunnel stand-in, on
light pods (bench/agent_light_pods.py: real netns + process in a real ``pod<uid>`` cgroup +
real Pod object with Running status, on a Node object of their own). Kubelet pods and real
traffic are in test_agent_kubelet_pods.py."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from bench.agent_light_pods import LightNode, LightPod
from cni_plugin import constants as c
from cni_plugin.redirection.registry import make_backend
from cni_plugin.redirection.settings import RedirectSettings
from testbed.mesh import mesh_env
from testbed.node import Testbed
from tests.testbed.agent_on_node import NodeAgent, wait

pytestmark = pytest.mark.testbed
AMBIENT = {c.DATAPLANE_MODE_LABEL: c.DATAPLANE_MODE_AMBIENT}
SETTINGS = RedirectSettings(dns_capture=False, ipv6=True)
BACKEND = make_backend("iptables")


def ebpf_options(info: dict[str, Any]) -> dict[str, Any]:
    from tests.netns.bpf_support import CACHE_DIR

    return {"pin_root": mesh_env(info, "ebpf")["AMBIENT_EBPF_PIN_ROOT"], "cache_dir": CACHE_DIR}


def rules_ok(pod: LightPod, backend: Any = BACKEND) -> bool:
    return bool(backend.check(pod.netns, SETTINGS).ok)


class Rig:
    def __init__(
        self, bed: Testbed, info: dict[str, Any], core: Any, reconcile: float, backend: str
    ) -> None:
        self.ln = LightNode(core)
        self.agent = NodeAgent(
            bed, info, node_name=self.ln.node_name, reconcile_seconds=reconcile, backend=backend
        )
        # The agent's own pins: the testbed instance's private pin root (testbed.mesh).
        self.backend = make_backend(backend, **ebpf_options(info) if backend == "ebpf" else {})
        self.core = core
        self.node_netns = info["node_netns"]

    def ann(self, pod: LightPod) -> str | None:
        p = self.core.read_namespaced_pod(pod.name, pod.namespace)
        value: str | None = (p.metadata.annotations or {}).get(c.REDIRECTION_ANNOTATION)
        return value

    def proxies(self) -> set[str]:
        started = [e["uid"] for e in self.agent.standin_events("proxy started")]
        stopped = [e["uid"] for e in self.agent.standin_events("proxy stopped")]
        live = set(started)
        for u in stopped:  # a uid may start again after stopping (netns replaced)
            if started.count(u) <= stopped.count(u):
                live.discard(u)
        return live


@pytest.fixture
def rig_factory(
    testbed_node: Testbed, testbed_info: dict[str, Any], kube_api: Any
) -> Iterator[Any]:
    from kubernetes import client

    core = client.CoreV1Api(kube_api)
    rigs: list[Rig] = []

    def make(reconcile: float = 60.0, backend: str = "iptables") -> Rig:
        r = Rig(testbed_node, testbed_info, core, reconcile, backend)
        rigs.append(r)
        r.ln.create_node()
        return r

    yield make
    problems: list[str] = []
    for r in rigs:
        r.agent.cleanup()
        problems += r.ln.cleanup()
    assert problems == []


@pytest.mark.parametrize("backend", ["iptables", "nftables", "ebpf"])
def test_label_enrolls_unlabel_removes_skips_untouched_delete_sends_del(
    rig_factory: Any, backend: str
) -> None:
    rig: Rig = rig_factory(backend=backend)
    ln = rig.ln
    ns = f"icnia-app-{ln.tag}"
    ln.create_namespace(ns)
    ln.create_namespace(f"icnia-other-{ln.tag}")
    pods = [ln.add_pod(ns, f"app-{i}") for i in range(6)]
    skipped = [
        ln.add_pod(ns, "opted-out", labels={c.DATAPLANE_MODE_LABEL: "none"}),
        ln.add_pod(ns, "sidecar", annotations={c.SIDECAR_STATUS_ANNOTATION: "{}"}),
        ln.add_pod(ns, "hostnet", host_netns=rig.node_netns),
        ln.add_pod("kube-system", f"icnia-ks-{ln.tag}", labels=dict(AMBIENT)),  # excluded ns
    ]
    rig.agent.start_standin()
    rig.agent.start()
    wait(rig.agent.ready, 60, "agent ready with ztunnel connected", rig.agent)
    assert all(rig.ann(p) is None for p in pods)

    ln.label_namespace(ns, dict(AMBIENT))
    wait(lambda: all(rig.ann(p) == "enabled" for p in pods), 60, "all enabled", rig.agent)
    for p in pods:
        rep = rig.backend.check(p.netns, SETTINGS)
        assert rep.ok, f"rules missing in {p.name}: missing={rep.missing} extra={rep.extra}"
    wait(lambda: {p.uid for p in pods} <= rig.proxies(), 30, "stand-in proxies for every pod")
    adds = {e["uid"]: e for e in rig.agent.standin_events("proxy started")}
    for p in pods:
        assert adds[p.uid]["ips"] == [p.ip]  # the stand-in read the IP inside the fd it got
    for p in skipped:
        assert rig.ann(p) is None, f"{p.name} annotated"
        assert p.uid not in adds, f"{p.name} sent to ztunnel"
    for p in skipped[:2] + skipped[3:]:
        assert not rules_ok(p, rig.backend) and not rig.backend.check(p.netns, SETTINGS).extra

    gone = pods.pop()
    ln.delete_pod(gone)
    wait(lambda: gone.uid not in rig.proxies(), 30, "Del for the deleted pod", rig.agent)

    ln.label_namespace(ns, {c.DATAPLANE_MODE_LABEL: None})
    wait(lambda: all(rig.ann(p) is None for p in pods), 60, "annotations null", rig.agent)
    for p in pods:
        rep = rig.backend.check(p.netns, SETTINGS)
        assert rep.missing and not rep.extra, f"rules left in {p.name}"
    wait(lambda: not ({p.uid for p in pods} & rig.proxies()), 30, "Del for every pod")


def test_sigkill_restart_never_drops_rules_and_resends_snapshot(rig_factory: Any) -> None:
    rig: Rig = rig_factory()
    ln = rig.ln
    ns = f"icnia-app-{ln.tag}"
    ln.create_namespace(ns, dict(AMBIENT))
    pods = [ln.add_pod(ns, f"app-{i}") for i in range(5)]
    rig.agent.start_standin()
    rig.agent.start()
    wait(lambda: all(rig.ann(p) == "enabled" for p in pods), 60, "enabled", rig.agent)
    lost: list[str] = []
    stop = threading.Event()

    def watch_rules() -> None:
        while not stop.is_set():
            lost.extend(p.name for p in pods if not rules_ok(p))

    t = threading.Thread(target=watch_rules)
    t.start()
    try:
        rig.agent.kill(signal.SIGKILL)
        rig.agent.start()
        wait(rig.agent.ready, 60, "restarted agent ready", rig.agent)
    finally:
        stop.set()
        t.join()
    assert lost == [], f"rules missing during the restart: {sorted(set(lost))}"
    # The stand-in kept every proxy (a full snapshot with every pod, nothing dropped).
    assert {p.uid for p in pods} <= rig.proxies()
    assert not rig.agent.standin_events("not in the new snapshot: dropping")
    st = rig.agent.state()
    enrolled = {p["uid"]: p for p in st["pods"] if p["state"] == "enabled"}
    assert set(enrolled) == {p.uid for p in pods}
    for p in pods:
        assert enrolled[p.uid]["netns_inode"] == os.stat(p.netns).st_ino
        assert enrolled[p.uid]["zds"] in ("snapshot", "acked")


def test_drift_rules_removed_and_netns_replaced_are_repaired(rig_factory: Any) -> None:
    rig: Rig = rig_factory(reconcile=2.0)
    ln = rig.ln
    ns = f"icnia-app-{ln.tag}"
    ln.create_namespace(ns, dict(AMBIENT))
    a, b = ln.add_pod(ns, "a"), ln.add_pod(ns, "b")
    rig.agent.start_standin()
    rig.agent.start()
    wait(lambda: rig.ann(a) == "enabled" and rig.ann(b) == "enabled", 60, "enabled", rig.agent)
    BACKEND.remove(a.netns, SETTINGS)  # rules deleted behind the agent's back
    old_inode = os.stat(b.netns).st_ino
    new_ns = ln.replace_netns(b)
    new_inode = os.stat(new_ns).st_ino

    def inode_of(uid: str) -> Any:
        return next(
            (p["netns_inode"] for p in rig.agent.state().get("pods", []) if p["uid"] == uid), None
        )

    wait(lambda: rules_ok(a), 30, "rules repaired in a", rig.agent)
    wait(
        lambda: inode_of(b.uid) == new_inode and rules_ok(b),
        30,
        "b enrolled in its new netns",
        rig.agent,
    )
    assert new_inode != old_inode
    wait(
        lambda: rig.agent.standin_events("netns changed: replacing proxy"),
        30,
        "stand-in replaced b's proxy",
    )
    assert rig.ann(b) == "enabled"


def test_apiserver_restart_agent_resumes_and_carries_on(
    rig_factory: Any, testbed_node: Testbed, testbed_info: dict[str, Any]
) -> None:
    """kube-apiserver killed and started again: the agent's watches fail (connection refused),
    it retries, resumes from the last resourceVersion (as client-go does; a 410 there would
    mean relist, shown against the fake API in tests/unit/test_informers.py) and carries on:
    a pod created after the restart is enrolled, a pod deleted after it gets its Del."""
    rig: Rig = rig_factory()
    ln = rig.ln
    ns = f"icnia-app-{ln.tag}"
    ln.create_namespace(ns, dict(AMBIENT))
    first = ln.add_pod(ns, "before")
    rig.agent.start_standin()
    rig.agent.start()
    wait(lambda: rig.ann(first) == "enabled", 60, "enabled", rig.agent)
    wait(lambda: first.uid in rig.proxies(), 30, "stand-in has the first pod")

    restart_apiserver(testbed_node, testbed_info)
    later = ln.add_pod(ns, "after")
    wait(
        lambda: rig.ann(later) == "enabled", 90, "pod created after the restart enrolled", rig.agent
    )
    assert rules_ok(later) and rules_ok(first)
    ln.delete_pod(first)
    wait(lambda: first.uid not in rig.proxies(), 60, "Del for a pod deleted after the restart")
    log = rig.agent.agent_log(tail=None)
    assert '"msg": "api server unreachable, will resume the watch"' in log
    informers = rig.agent.state()["informers"]
    assert informers["pods"]["errors"] > 0 and informers["pods"]["synced"]


def restart_apiserver(bed: Testbed, info: dict[str, Any]) -> None:
    """Kill kube-apiserver and start it again with the same arguments (testbed launcher)."""
    import time
    from pathlib import Path

    # The launcher knows the current pid if this process restarted it before; the state file
    # only has the one `up` started.
    pid = bed._launcher.pids.get("kube-apiserver") or int(
        bed.status()["info"]["pids"]["kube-apiserver"]
    )
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
        time.sleep(0.05)
    time.sleep(1.0)  # the agent's watches fail and retry against a dead server
    bed._launcher.start("kube-apiserver", [a.decode() for a in argv])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if bed.kubectl("get", "--raw", "/readyz", check=False).returncode == 0:
            return
        time.sleep(0.2)
    raise AssertionError("kube-apiserver did not come back in 60s")
