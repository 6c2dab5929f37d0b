"""Enroller: the SPEC §4 order of add/remove steps and what each failure leaves behind.
The namespace handle is this process's own netns (opened with the host check off): the
edges are recording fakes, the real ones run in tests/netns/test_agent_netns.py."""

from __future__ import annotations

import pytest

from cni_plugin import constants as c
from cni_plugin.errors import NotRetryableError, ZtunnelUnavailableError
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


def test_add_then_remove_follow_the_spec_order() -> None:
    order: list[str] = []
    e, _rules, zt, probes, _ = _enroller(order)
    entry = e.add(POD, _netns())
    assert order == ["rules", "zds-add", "probe-add", f"annotate:{c.REDIRECTION_ENABLED}"]
    assert (
        entry.state == "enabled" and entry.zds == "acked" and probes.members == {"10.0.0.9": "u1"}
    )
    order.clear()
    e.remove(POD, exists=True)
    assert order == ["probe-remove", "rules-remove", "zds-del", "annotate:None"]
    assert "u1" not in e.cache and zt.dels == ["u1"]
    assert entry.netns is not None and entry.netns.fd == -1  # handle closed


def test_deleted_pod_keeps_its_rules_untouched_and_gets_no_patch() -> None:
    order: list[str] = []
    e, *_ = _enroller(order)
    e.add(POD, _netns())
    order.clear()
    e.remove(POD, exists=False)
    assert order == ["probe-remove", "zds-del"]


def test_rules_failure_stops_the_attempt_not_retryable_nothing_cached() -> None:
    order: list[str] = []
    e, rules, *_ = _enroller(order)
    rules.fail = True
    ns = _netns()
    with pytest.raises(NotRetryableError):
        e.add(POD, ns)
    assert order == ["rules"] and "u1" not in e.cache
    assert ns.fd == -1  # the handle is not leaked


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
    assert order == ["rules", "zds-add", "probe-add"]
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
