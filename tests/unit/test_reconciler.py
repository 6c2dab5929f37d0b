"""Reconciler: adoption at start and every branch of a drift pass, over the fakes of
tests/agent_fakes.py (the real Enroller in between): pods adopted with and without their
namespace, rules removed behind the agent's back, the namespace replaced under the same
UID or found again, failed repairs, pods the pass must leave to the controller, and the
backend's housekeeping. No root; the same over real namespaces: tests/netns/test_agent_netns.py."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from cni_plugin import constants as c
from cni_plugin.errors import RedirectionError
from node_agent.pod_cache import PodState, ZdsState
from node_agent.reconciler import Reconciler
from node_agent.resources import PodInfo
from tests.agent_fakes import AgentEdges

ENABLED = {c.REDIRECTION_ANNOTATION: c.REDIRECTION_ENABLED}


class Rig(AgentEdges):
    def __init__(self) -> None:
        super().__init__()
        self.unwanted: set[str] = set()
        self.repairs: list[str] = []
        self.housekeeping = 0
        self.housekeeping_error: Exception | None = None
        self.rec = Reconciler(
            pods=self.pods,
            cache=self.cache,
            enroller=self.enroller,
            finder=self.finder,
            opener=self.opener,
            runner=self.queue,
            wants=lambda p: p.uid not in self.unwanted,
            on_repair=self.repairs.append,
            after_pass=self._housekeep,
        )

    def _housekeep(self) -> None:
        self.housekeeping += 1
        if self.housekeeping_error is not None:
            raise self.housekeeping_error

    def annotated(self, name: str, *, annotated: bool = True, **kw: Any) -> PodInfo:
        return self.pod("shop", name, annotations=dict(ENABLED) if annotated else {}, **kw)

    def enrolled(self, name: str) -> PodInfo:
        pod = self.annotated(name)
        self.enroller.add(pod, self.opener.open("/proc/self/ns/net"))
        return pod


@pytest.fixture
def rig() -> Rig:
    return Rig()


def test_adoption_rebuilds_the_cache_from_annotations(rig: Rig) -> None:
    seen = rig.annotated("seen")
    lost = rig.annotated("lost", found=False)
    rig.annotated("plain", annotated=False)
    rig.annotated("finished", phase="Succeeded")
    assert rig.rec.adopt_annotated() == 2
    entries = {e.name: e for e in rig.cache.entries()}
    assert set(entries) == {"seen", "lost"}
    assert entries["seen"].zds == ZdsState.SNAPSHOT and entries["seen"].netns is not None
    assert entries["lost"].zds == ZdsState.KEEP and entries["lost"].netns is None  # Keep{uid}
    assert all(e.state == PodState.ENABLED for e in entries.values())
    assert rig.rules.calls == [] and rig.zt.adds == []  # rules assumed, ztunnel via snapshot
    assert seen.uid in rig.cache and lost.uid in rig.cache


def test_adoption_of_a_namespace_that_vanished_meanwhile_is_a_keep(rig: Rig) -> None:
    p = rig.annotated("p")
    rig.opener.gone.add("/proc/self/ns/net")
    rig.rec.adopt_annotated()
    entry = rig.cache.get(p.uid)
    assert entry is not None and entry.netns is None and entry.zds == ZdsState.KEEP


def test_intact_pods_are_checked_and_left_alone(rig: Rig) -> None:
    p = rig.enrolled("p")
    report = rig.rec.run_pass()
    assert report.checked == 1 and not report.rules_repaired and not report.errors
    check = rig.rec.checks[p.uid]
    assert check.ok and check.repaired_ok is None
    assert rig.repairs == [] and rig.housekeeping == 1 and rig.queue.exclusive == [p.uid]


def test_rules_removed_behind_the_agents_back_are_applied_again(rig: Rig) -> None:
    p = rig.enrolled("p")
    rig.rules.installed.clear()
    report = rig.rec.run_pass()
    assert report.rules_repaired == [p.uid] and rig.repairs == ["rules_missing"]
    check = rig.rec.checks[p.uid]
    assert not check.ok and check.missing == ("all rules",) and check.repaired_ok is True
    assert rig.rec.run_pass().rules_repaired == []  # repaired for good


def test_failed_pod_whose_rules_are_back_is_enabled_again(rig: Rig) -> None:
    p = rig.enrolled("p")
    entry = rig.cache.get(p.uid)
    assert entry is not None
    entry.state, entry.last_error = PodState.FAILED, "earlier failure"
    rig.rec.run_pass()
    assert (entry.state, entry.last_error) == (PodState.ENABLED, "")


def test_replaced_namespace_is_enrolled_again(rig: Rig) -> None:
    p = rig.enrolled("p")
    rig.finder.show(p.uid, replaced=True)
    report = rig.rec.run_pass()
    assert report.netns_replaced == [p.uid] and rig.repairs == ["netns_replaced"]
    assert [u for u, _ in rig.zt.adds] == [p.uid, p.uid]  # ztunnel told of the new one
    rig.finder.show(p.uid)  # /proc now shows what the agent holds
    assert rig.rec.run_pass().netns_replaced == []


def test_namespace_found_after_adoption_without_it(rig: Rig) -> None:
    p = rig.annotated("p", found=False)
    rig.rec.adopt_annotated()
    rig.finder.show(p.uid)
    report = rig.rec.run_pass()
    assert report.netns_found == [p.uid] and rig.repairs == ["netns_found"]
    entry = rig.cache.get(p.uid)
    assert entry is not None and entry.netns is not None and entry.zds == ZdsState.ACKED


def test_a_failed_repair_is_reported_and_the_pass_goes_on(rig: Rig) -> None:
    bad, good = rig.enrolled("bad"), rig.enrolled("good")
    rig.rules.installed.clear()
    rig.rules.fail = True
    report = rig.rec.run_pass()
    assert set(report.errors) == {bad.uid, good.uid}
    assert "fake rule failure" in report.errors[bad.uid] and rig.housekeeping == 1


def test_pods_the_controller_owns_now_are_skipped(rig: Rig) -> None:
    gone, ending, unwanted = rig.enrolled("gone"), rig.enrolled("ending"), rig.enrolled("x")
    rig.pods.drop(gone.uid)
    rig.pods.put(PodInfo.from_json({**rig.kube.pod(ending.uid), "status": {"phase": "Failed"}}))
    rig.unwanted.add(unwanted.uid)
    rig.rules.installed.clear()
    applies = len(rig.rules.calls)
    report = rig.rec.run_pass()
    assert report.checked == 0 and len(rig.rules.calls) == applies and rig.repairs == []
    assert rig.rec.checks == {}


def test_checks_of_pods_gone_from_the_cache_are_dropped(rig: Rig) -> None:
    p = rig.enrolled("p")
    rig.rec.run_pass()
    assert p.uid in rig.rec.checks
    rig.enroller.remove(p, exists=False)
    rig.rec.run_pass()
    assert p.uid not in rig.rec.checks


def test_housekeeping_failure_is_logged_not_raised(rig: Rig) -> None:
    rig.enrolled("p")
    rig.housekeeping_error = RedirectionError("pins unreadable")
    report = rig.rec.run_pass()
    assert report.checked == 1 and rig.housekeeping == 1
    rig.housekeeping_error = OSError("proc root gone")
    rig.rec.run_pass()
    assert rig.housekeeping == 2


def test_the_start_up_pass_checks_pods_side_by_side(rig: Rig) -> None:
    """``run_pass(parallel=n)`` (the start-up pass the ZDS snapshot waits for) runs checks
    concurrently: each check below waits at a barrier for the other, so a pass that ran them
    one after another would break it; repairs and the report stay per pod."""
    a, b = rig.enrolled("a"), rig.enrolled("b")
    meet = threading.Barrier(2, timeout=5)
    real_check = rig.rules.check
    first: set[str] = set()

    def check(netns_path: str, settings: Any) -> Any:
        result = real_check(netns_path, settings)
        if netns_path not in first:  # each pod's first check (its re-check after repair: not)
            first.add(netns_path)
            meet.wait()  # both pods share one namespace here: both looked before any repair
        return result

    rig.rules.check = check  # type: ignore[method-assign]
    rig.rules.installed.clear()  # both drifted: both repaired
    report = rig.rec.run_pass(parallel=2)
    assert report.checked == 2 and not report.errors
    assert sorted(report.rules_repaired) == sorted([a.uid, b.uid])
    assert rig.repairs == ["rules_missing", "rules_missing"] and rig.housekeeping == 1
    assert all(rig.rec.checks[p.uid].repaired_ok for p in (a, b))


def test_the_start_up_pass_leaves_node_upkeep_to_the_periodic_ones(rig: Rig) -> None:
    p = rig.enrolled("p")
    report = rig.rec.run_pass(8, upkeep=False)  # the agent set the node up just before
    assert report.checked == 1 and rig.rec.checks[p.uid].ok and rig.housekeeping == 0
    rig.rec.run_pass()
    assert rig.housekeeping == 1
