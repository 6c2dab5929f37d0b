"""Enroller: the order of add/remove steps and what each failure leaves behind (ztunnel's
listeners before the rules while ztunnel is connected, SPEC §4's rules first otherwise).
The namespace handle is this process's own netns (opened with the host check off): the
edges are recording fakes, the real ones run in tests/netns/test_agent_netns.py."""

from __future__ import annotations

import pytest

from cni_plugin import constants as c
from cni_plugin.errors import NotRetryableError, ZtunnelRejectedError, ZtunnelUnavailableError
from cni_plugin.netns import Netns
from cni_plugin.redirection.settings import RedirectSettings
from node_agent.enrollment import Enroller
from node_agent.pod_cache import PodCache
from node_agent.resources import PodInfo
from tests.agent_fakes import FakeProbes, FakeRules, FakeZtunnel

POD = PodInfo(uid="u1", namespace="ns", name="p", ips=("10.0.0.9",), service_account="sa")


Rig = tuple[Enroller, FakeRules, FakeZtunnel, FakeProbes, list[tuple[str, str | None]]]


def _enroller(order: list[str], zt_connected: bool = True) -> Rig:
    rules, zt, probes = FakeRules(order), FakeZtunnel(zt_connected, order), FakeProbes(order)
    patches: list[tuple[str, str | None]] = []

    class Ann:
        def patch_redirection(self, namespace: str, name: str, value: str | None) -> bool:
            order.append(f"annotate:{value}")
            patches.append((name, value))
            return True

    e = Enroller(rules, zt, probes, Ann(), PodCache(), lambda p: RedirectSettings())
    return e, rules, zt, probes, patches


def _netns() -> Netns:
    return Netns.open("/proc/self/ns/net", host_netns=None)


def test_add_with_ztunnel_connected_opens_listeners_before_the_rules_then_remove() -> None:
    order: list[str] = []
    e, _rules, zt, probes, _ = _enroller(order)
    entry = e.add(POD, _netns())
    # Issue 19: rules first would redirect the running pod's connections to ports ztunnel
    # does not listen on yet; ztunnel acks an Add once its listeners are open.
    assert order == ["zds-add", "rules", "probe-add", f"annotate:{c.REDIRECTION_ENABLED}"]
    assert (
        entry.state == "enabled" and entry.zds == "acked" and probes.members == {"10.0.0.9": "u1"}
    )
    order.clear()
    e.remove(POD, exists=True)
    # The annotation goes first, ztunnel's listeners stay for the other ztunnels to hear it.
    assert order == ["probe-remove", "rules-remove", "annotate:None", "zds-del-after:2"]
    assert "u1" not in e.cache and zt.dels == ["u1"]
    assert entry.netns is not None and entry.netns.fd == -1  # handle closed


def test_deleted_pod_keeps_its_rules_untouched_and_gets_no_patch() -> None:
    order: list[str] = []
    e, *_ = _enroller(order)
    e.add(POD, _netns())
    order.clear()
    e.remove(POD, exists=False)
    assert order == ["probe-remove", "zds-del"]


@pytest.mark.parametrize("connected", [True, False])
def test_rules_failure_stops_the_attempt_not_retryable_nothing_cached(connected: bool) -> None:
    order: list[str] = []
    e, rules, zt, *_ = _enroller(order, zt_connected=connected)
    rules.fail = True
    ns = _netns()
    with pytest.raises(NotRetryableError):
        e.add(POD, ns)
    # With ztunnel connected it took the pod first, and is told to let go of it again.
    assert order == (["zds-add", "rules", "zds-del"] if connected else ["rules"])
    assert "u1" not in e.cache and zt.dels == (["u1"] if connected else [])
    assert ns.fd == -1  # the handle is not leaked


def test_rules_failure_on_a_known_pod_keeps_its_proxy_and_entry() -> None:
    order: list[str] = []
    e, rules, *_ = _enroller(order)
    ns = _netns()
    e.add(POD, ns)
    order.clear()
    rules.fail = True
    with pytest.raises(NotRetryableError):
        e.add(POD, ns)  # e.g. the bypass-inbound annotation toggled: same namespace
    # Its older rules may still redirect to ztunnel: no Del, the entry stays (failed).
    assert order == ["zds-add", "rules"]
    entry = e.cache.get("u1")
    assert entry is not None and entry.state == "failed" and ns.fd >= 0
    e.cache.close()


def test_ztunnel_refusing_before_the_rules_leaves_the_pod_captured_and_pending() -> None:
    order: list[str] = []
    e, _rules, zt, *_ = _enroller(order)
    zt.reject = True
    with pytest.raises(ZtunnelRejectedError):
        e.add(POD, _netns())
    # Never unredirected: the rules still go in; ztunnel is not asked twice in one attempt.
    assert order == ["zds-add", "rules", f"annotate:{c.REDIRECTION_PENDING}"]
    entry = e.cache.get("u1")
    assert entry is not None and entry.state == "pending" and entry.zds == "pending"
    e.cache.close()


def test_ztunnel_failure_caches_pending_and_annotates_pending() -> None:
    order: list[str] = []
    e, *_ = _enroller(order, zt_connected=False)
    with pytest.raises(ZtunnelUnavailableError):
        e.add(POD, _netns())
    assert order == ["rules", "zds-add", f"annotate:{c.REDIRECTION_PENDING}"]
    entry = e.cache.get("u1")
    assert entry is not None and entry.state == "pending" and entry.netns_path is not None
    e.cache.close()


def test_already_annotated_pod_is_not_patched_again() -> None:
    order: list[str] = []
    e, *_ = _enroller(order)
    annotated = PodInfo(uid="u1", namespace="ns", name="p", ips=("10.0.0.9",),
                        annotations={c.REDIRECTION_ANNOTATION: c.REDIRECTION_ENABLED})  # fmt: skip
    e.add(annotated, _netns())
    assert order == ["zds-add", "rules", "probe-add"]
    e.cache.close()


def test_a_pod_ztunnel_took_before_its_rules_is_in_a_reconnecting_ztunnels_snapshot() -> None:
    """Between the Add and the rules the entry is ``enrolling``; a ztunnel reconnecting then
    must get it in its snapshot, or it would drop the proxy the rules are about to use."""
    from node_agent.adapters import CacheSnapshot
    from node_agent.pod_cache import CachedPod

    cache = PodCache()
    cache.put(CachedPod("u1", "ns", "p", "sa", ("10.0.0.9",), netns=_netns()))
    assert [s.uid for s in CacheSnapshot(cache).snapshot()] == ["u1"]
    cache.close()


class _RecordingServer:
    def __init__(self) -> None:
        self.sent: list[str] = []
        self.connected = True

    def add(self, uid: str, netns_path: str, info: object) -> None:
        self.sent.append(f"add {uid}")

    def delete(self, uid: str) -> None:
        self.sent.append(f"del {uid}")


def test_deferred_del_is_sent_after_its_delay_unless_the_pod_is_added_again() -> None:
    import time

    from node_agent.adapters import ZdsZtunnel
    from node_agent.pod_cache import CachedPod

    server = _RecordingServer()
    zt = ZdsZtunnel(server)  # type: ignore[arg-type]
    pod = CachedPod("u1", "ns", "p", "sa", ("10.0.0.9",), netns=None)
    zt.delete_later("u1", 0.2)
    zt.delete_later("u2", 0.05)
    zt.add_pod(pod, "/proc/self/ns/net")  # re-enrolled within the grace: no Del for u1
    deadline = time.monotonic() + 5
    while "del u2" not in server.sent and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.4)
    assert server.sent == ["add u1", "del u2"]
    zt.delete_later("u1", 0.05)
    zt.delete("u1")  # deleted meanwhile: one Del now, none later
    time.sleep(0.2)
    assert server.sent == ["add u1", "del u2", "del u1"]


def test_a_running_pod_leaves_through_its_departure_and_an_add_cancels_it() -> None:
    """Leaving goes through the backend's departure (captured connections keep their path
    until ztunnel drained them); enrolling again cancels what is pending; a running pod is
    primed under a NAT hold before its rules, a new sandbox is not."""
    order: list[str] = []
    e, *_ = _enroller(order)

    class Hold:
        def hold(self, netns_path: str) -> None:
            order.append("hold")

        def release(self, netns_path: str) -> None:
            order.append("release")

        def open_connections(self, netns_path: str) -> int:
            return 1

    class Leave:
        def leave(
            self, uid: str, netns_path: str, settings: RedirectSettings, drain_s: float
        ) -> None:
            order.append(f"leave:{uid}:{drain_s:g}")

        def cancel(self, uid: str) -> None:
            order.append(f"cancel:{uid}")

    e.nat, e.departure, e.prime_s = Hold(), Leave(), 0.0
    ns = _netns()
    e.add(POD, ns)
    assert order == ["cancel:u1", "zds-add", "hold", "rules", "release", "probe-add",
                     f"annotate:{c.REDIRECTION_ENABLED}"]  # fmt: skip
    order.clear()
    e.remove(POD, exists=True)
    assert order == ["probe-remove", "leave:u1:8", "annotate:None", "zds-del-after:2"]
    order.clear()
    e.add(POD, _netns(), running=False)
    assert "hold" not in order and order[0] == "cancel:u1"
    e.cache.close()


def test_an_ignored_annotation_is_logged_with_the_pods_identity(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from dataclasses import replace

    e, *_ = _enroller([])
    pod = replace(POD, annotations={c.DNS_CAPTURE_ANNOTATION: "maybe"})
    with caplog.at_level("WARNING", logger="node_agent"):
        e.add(pod, _netns()).netns.close()  # type: ignore[union-attr]
    (rec,) = [r for r in caplog.records if c.DNS_CAPTURE_ANNOTATION in r.getMessage()]
    assert "only boolean values are supported" in rec.getMessage()
    assert rec.fields["pod"] == {"namespace": "ns", "name": "p", "uid": "u1"}  # type: ignore[attr-defined]


def test_retry_after_a_failed_annotation_patch_only_patches() -> None:
    """Issue 14 (API server away during enrolment): ztunnel acked and the rules went in,
    the annotation patch failed; the retry does only what is left, no second Add, no second
    rules install. A new namespace handle (the sandbox was re-made) does it all again."""
    from node_agent.kube import KubeError

    order: list[str] = []
    e, _rules, _zt, _probes, patches = _enroller(order)
    ann = e.annotator
    real_patch = ann.patch_redirection
    outage = [True]

    def patch(namespace: str, name: str, value: str | None) -> bool:
        if outage[0]:
            order.append("annotate-failed")
            raise KubeError("cannot annotate pod ns/p: timed out")
        return real_patch(namespace, name, value)

    ann.patch_redirection = patch  # type: ignore[method-assign]
    ns = _netns()
    with pytest.raises(KubeError):
        e.add(POD, ns)
    assert order == ["zds-add", "rules", "probe-add", "annotate-failed"]
    order.clear()
    outage[0] = False
    entry = e.add(POD, ns)
    assert order == ["probe-add", f"annotate:{c.REDIRECTION_ENABLED}"]
    assert entry.state == "enabled" and patches == [("p", c.REDIRECTION_ENABLED)]
    order.clear()
    e.add(POD, _netns())  # a different namespace: everything again
    assert order[:2] == ["zds-add", "rules"]
    e.cache.close()
