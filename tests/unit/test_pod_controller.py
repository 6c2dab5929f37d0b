"""PodController's decisions, one branch at a time, over the fakes of tests/agent_fakes.py
(the real Enroller in between): labelling and unlabelling namespaces and pods, our own
annotation lagging in the informer, terminal and deleted pods, the plugin's ADD racing the
informer, namespaces not found yet, a failure retrying cannot fix, ztunnel coming back.
No root, no threads: the queue records what it is asked and the test drives ``reconcile``.
The same decisions over real namespaces and rules: tests/netns/test_agent_netns.py."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import pytest

from cni_plugin import constants as c
from cni_plugin.enablement import EnablementPolicy
from cni_plugin.errors import IstioCniError, NotRetryableError
from node_agent.pod_cache import PodState, ZdsState
from node_agent.pod_controller import ANNOTATION_LAG_S, PluginAdd, PodController, RetryLater
from node_agent.resources import NamespaceInfo, PodInfo
from tests.agent_fakes import AgentEdges, DictStore, make_pod

AMBIENT = {c.DATAPLANE_MODE_LABEL: c.DATAPLANE_MODE_AMBIENT}
OPT_OUT = {c.DATAPLANE_MODE_LABEL: c.DATAPLANE_MODE_NONE}


class Rig(AgentEdges):
    def __init__(self, *, ambient_enabled: bool = True, zt_connected: bool = True) -> None:
        super().__init__(zt_connected=zt_connected)
        self.namespaces: DictStore[NamespaceInfo] = DictStore(lambda n: n.name)
        self.settled = 0
        self.ctl = PodController(
            ambient_enabled=ambient_enabled,
            policy=EnablementPolicy(),
            pods=self.pods,
            namespaces=self.namespaces,
            enroller=self.enroller,
            finder=self.finder,
            opener=self.opener,
            cache=self.cache,
            queue=self.queue,
            reader=self.kube,
            on_settled=self._settle,
        )

    def _settle(self) -> None:
        self.settled += 1

    def namespace(self, name: str, labels: dict[str, str] | None = None) -> NamespaceInfo:
        old = self.namespaces.get(name)
        new = self.namespaces.put(NamespaceInfo(name, labels or {}))
        self.ctl.on_namespace(old, new)
        return new

    def update(self, pod: PodInfo, **changes: Any) -> PodInfo:
        old = self.pods.get(pod.uid)
        new = self.pods.put(replace(pod, **changes))
        self.ctl.on_pod(old, new)
        return new

    def annotation(self, pod: PodInfo) -> str | None:
        return self.kube.annotation(pod.uid)

    def seen_by_informer(self, pod: PodInfo) -> PodInfo:
        """The informer's copy catches up with our own annotation patch."""
        ann = dict(pod.annotations)
        value = self.annotation(pod)
        if value is None:
            ann.pop(c.REDIRECTION_ANNOTATION, None)
        else:
            ann[c.REDIRECTION_ANNOTATION] = value
        return self.pods.put(replace(pod, annotations=ann))


def _applies(rig: Rig) -> int:
    return sum(1 for verb, _ in rig.rules.calls if verb == "apply")


@pytest.fixture
def rig() -> Rig:
    return Rig()


def test_labelling_a_namespace_enrolls_its_pods_and_unlabelling_removes_them(rig: Rig) -> None:
    rig.namespace("shop")
    a, b = rig.pod("shop", "a", ip="10.0.0.1"), rig.pod("shop", "b", ip="10.0.0.2")
    other = rig.pod("elsewhere", "c", ip="10.0.0.3")
    rig.namespace("shop", AMBIENT)
    assert sorted(rig.queue.added) == sorted([a.uid, b.uid])  # only that namespace's pods
    for p in (a, b, other):
        rig.ctl.reconcile(p.uid)
    assert rig.annotation(a) == rig.annotation(b) == c.REDIRECTION_ENABLED
    assert rig.annotation(other) is None and other.uid not in rig.cache
    assert {u for u, _ in rig.zt.adds} == {a.uid, b.uid}
    assert rig.cache.count(PodState.ENABLED) == 2 and rig.settled == 3
    assert set(rig.probes.members.values()) == {a.uid, b.uid}

    rig.queue.added.clear()
    rig.namespace("shop", {**AMBIENT, "team": "x"})  # dataplane-mode unchanged
    assert rig.queue.added == []
    rig.namespace("shop")
    assert sorted(rig.queue.added) == sorted([a.uid, b.uid])
    for p in (a, b):
        rig.ctl.reconcile(rig.seen_by_informer(p).uid)
    assert rig.annotation(a) is None and rig.annotation(b) is None
    assert len(rig.cache) == 0 and sorted(rig.zt.dels) == sorted([a.uid, b.uid])
    assert [v for v, _ in rig.rules.calls].count("remove") == 2  # pods exist: rules go
    assert rig.probes.members == {}


def test_pod_label_enrolls_in_an_unlabelled_namespace_and_opt_out_wins(rig: Rig) -> None:
    rig.namespace("shop")
    p = rig.pod("shop", "p", labels=AMBIENT)
    rig.ctl.reconcile(p.uid)
    assert rig.annotation(p) == c.REDIRECTION_ENABLED
    rig.namespace("labelled", AMBIENT)
    q = rig.pod("labelled", "q", labels=OPT_OUT)
    rig.ctl.reconcile(q.uid)
    assert q.uid not in rig.cache and rig.annotation(q) is None
    # Unlabelling the pod takes it out again.
    p = rig.update(rig.seen_by_informer(p), labels={})
    assert rig.queue.added[-1] == p.uid
    rig.ctl.reconcile(p.uid)
    assert p.uid not in rig.cache and rig.annotation(p) is None and rig.zt.dels == [p.uid]


def test_ambient_disabled_enrolls_nothing() -> None:
    rig = Rig(ambient_enabled=False)
    rig.namespace("shop", AMBIENT)
    p = rig.pod("shop", "p")
    rig.ctl.reconcile(p.uid)
    assert p.uid not in rig.cache and rig.rules.calls == [] and rig.kube.patches == []


def test_pod_without_ip_waits_for_the_update_that_brings_it(rig: Rig) -> None:
    rig.namespace("shop", AMBIENT)
    p = rig.pod("shop", "p", ip=None)
    rig.ctl.reconcile(p.uid)
    assert rig.rules.calls == [] and rig.queue.forgotten == []  # neither done nor failed
    p = rig.update(p, ips=("10.0.0.7",))
    rig.ctl.reconcile(p.uid)
    assert rig.annotation(p) == c.REDIRECTION_ENABLED


def test_our_annotation_lagging_in_the_informer_is_not_a_reason_to_enrol_again(
    rig: Rig,
) -> None:
    rig.namespace("shop", AMBIENT)
    p = rig.pod("shop", "p")
    rig.ctl.reconcile(p.uid)
    assert _applies(rig) == 1
    # An event older than our own patch: the store's copy has no annotation yet.
    rig.ctl.reconcile(p.uid)
    assert _applies(rig) == 1
    ((key, delay),) = rig.queue.later
    assert key == p.uid and 0 < delay <= ANNOTATION_LAG_S
    # Once the informer shows it, the pod is simply done.
    rig.seen_by_informer(p)
    rig.ctl.reconcile(p.uid)
    assert _applies(rig) == 1 and len(rig.queue.later) == 1
    # Someone removed the annotation long after our patch: enrolled again (re-annotated).
    entry = rig.cache.get(p.uid)
    assert entry is not None
    entry.annotated_at = time.monotonic() - ANNOTATION_LAG_S - 1
    rig.pods.put(replace(p, annotations={}))
    rig.ctl.reconcile(p.uid)
    assert _applies(rig) == 2 and rig.annotation(p) == c.REDIRECTION_ENABLED


def test_bypass_inbound_toggle_enrolls_again_with_the_other_variant(rig: Rig) -> None:
    rig.namespace("shop", AMBIENT)
    p = rig.seen_by_informer(rig.pod("shop", "p"))
    rig.ctl.reconcile(p.uid)
    p = rig.seen_by_informer(p)
    p = rig.update(p, annotations={**p.annotations, c.BYPASS_INBOUND_ANNOTATION: "true"})
    rig.ctl.reconcile(p.uid)
    entry = rig.cache.get(p.uid)
    assert _applies(rig) == 2 and entry is not None and entry.bypass_inbound


def test_terminal_pod_is_removed_without_touching_rules_and_its_annotation_cleared(
    rig: Rig,
) -> None:
    rig.namespace("shop", AMBIENT)
    p = rig.pod("shop", "job")
    rig.ctl.reconcile(p.uid)
    p = rig.update(rig.seen_by_informer(p), phase="Succeeded")
    rig.ctl.reconcile(p.uid)
    assert p.uid not in rig.cache and rig.zt.dels == [p.uid]
    assert "remove" not in [v for v, _ in rig.rules.calls]  # its sandbox is gone or going
    assert rig.annotation(p) is None
    # A terminal pod the agent never held, without annotation: nothing at all.
    q = rig.pod("shop", "done", phase="Failed")
    rig.ctl.reconcile(q.uid)
    assert rig.zt.dels == [p.uid] and q.uid in rig.queue.forgotten


def test_deleted_pod_gets_a_ztunnel_del_and_no_patch(rig: Rig) -> None:
    rig.namespace("shop", AMBIENT)
    p = rig.seen_by_informer(rig.pod("shop", "p"))
    rig.ctl.reconcile(p.uid)
    patches = len(rig.kube.patches)
    rig.pods.drop(p.uid)
    rig.ctl.on_pod(p, None)
    rig.ctl.reconcile(p.uid)
    assert p.uid not in rig.cache and rig.zt.dels == [p.uid]
    assert "remove" not in [v for v, _ in rig.rules.calls] and len(rig.kube.patches) == patches
    # The tombstone is used once: a repeat is a no-op.
    rig.ctl.reconcile(p.uid)
    assert rig.zt.dels == [p.uid]


def test_plugin_add_racing_the_informer_enrolls_once(rig: Rig) -> None:
    rig.namespace("shop", AMBIENT)
    p = rig.pod("shop", "p")
    event = PluginAdd(netns="/var/run/netns/cni-1", pod_name="p", pod_namespace="shop", ips=())
    assert rig.ctl.plugin_add(event) == "enrolled"
    assert rig.queue.exclusive == [p.uid] and rig.opener.opened == ["/var/run/netns/cni-1"]
    # The informer's event for the same pod, after the plugin: nothing to do again.
    rig.ctl.reconcile(rig.seen_by_informer(p).uid)
    assert _applies(rig) == 1 and len(rig.zt.adds) == 1
    # The runtime repeating the ADD for the same namespace: already enrolled.
    assert rig.ctl.plugin_add(event) == "already enrolled"
    assert _applies(rig) == 1


def test_plugin_add_before_the_informer_knows_the_pod_asks_the_api(rig: Rig) -> None:
    rig.namespace("shop", AMBIENT)
    raw = make_pod("shop", "new")
    rig.kube.put_pod(raw)  # in the API, not in the informer's store yet
    event = PluginAdd("/var/run/netns/cni-2", "new", "shop", ("10.0.0.42",))
    assert rig.ctl.plugin_add(event) == "enrolled"
    assert rig.probes.members == {"10.0.0.42": raw["metadata"]["uid"]}  # the plugin's IPs
    with pytest.raises(IstioCniError, match="not found in the API"):
        rig.ctl.plugin_add(PluginAdd("/var/run/netns/cni-3", "ghost", "shop", ()))
    rig.namespace("off")
    rig.kube.put_pod(make_pod("off", "plain"))
    assert rig.ctl.plugin_add(PluginAdd("/x", "plain", "off", ())).startswith("not enrolled")


def test_sandbox_not_in_proc_yet_is_retried_later(rig: Rig) -> None:
    rig.namespace("shop", AMBIENT)
    p = rig.pod("shop", "p", found=False)
    with pytest.raises(RetryLater, match="/fake/proc"):
        rig.ctl.reconcile(p.uid)
    assert rig.rules.calls == [] and p.uid not in rig.queue.forgotten
    rig.finder.show(p.uid)
    rig.opener.gone.add("/proc/self/ns/net")  # the process exited in between
    with pytest.raises(RetryLater):
        rig.ctl.reconcile(p.uid)
    rig.opener.gone.clear()
    rig.ctl.reconcile(p.uid)
    assert rig.annotation(p) == c.REDIRECTION_ENABLED and p.uid in rig.queue.forgotten


def test_rules_failure_is_not_retryable_and_leaves_the_pod_unannotated(rig: Rig) -> None:
    """As Istio's agent does with ErrNonRetryableAdd: no annotation (not even pending), no
    probe-set entry, the error kept for `istio-cni-agent pod`, the queue told not to retry."""
    rig.namespace("shop", AMBIENT)
    p = rig.pod("shop", "p")
    rig.rules.fail = True
    with pytest.raises(NotRetryableError):
        rig.ctl.reconcile(p.uid)
    assert rig.annotation(p) is None and rig.probes.members == {} and p.uid not in rig.cache
    (record,) = rig.ctl.records({})
    assert "fake rule failure" in record.last_error and record.state == ""


def test_ztunnel_away_leaves_the_pod_pending_and_its_return_retries_it_at_once() -> None:
    rig = Rig(zt_connected=False)
    rig.namespace("shop", AMBIENT)
    p = rig.pod("shop", "p")
    with pytest.raises(IstioCniError):
        rig.ctl.reconcile(p.uid)
    entry = rig.cache.get(p.uid)
    assert entry is not None and (entry.state, entry.zds) == (PodState.PENDING, ZdsState.PENDING)
    assert rig.annotation(p) == c.REDIRECTION_PENDING
    rig.queue.added.clear()
    rig.ctl.ztunnel_changed(False)
    assert rig.queue.added == []
    rig.zt.set_connected(True)
    rig.ctl.ztunnel_changed(True)
    assert rig.queue.added == [p.uid] and rig.queue.forgotten[-1] == p.uid  # backoff reset
    rig.ctl.reconcile(p.uid)
    assert rig.annotation(p) == c.REDIRECTION_ENABLED


def test_pod_status_and_records_show_the_decision_and_the_cache(rig: Rig) -> None:
    rig.namespace("shop", AMBIENT)
    p = rig.pod("shop", "p")
    rig.ctl.reconcile(p.uid)
    status = rig.ctl.pod_status("shop", "p")
    assert status["known"] and status["ambient"] and status["state"] == "enabled"
    assert not rig.ctl.pod_status("shop", "nope")["known"]
    (record,) = rig.ctl.records({})
    assert (record.state, record.zds, record.decision) == ("enabled", "acked", "ambient")
    assert record.netns_inode is not None and record.ips == p.ips
