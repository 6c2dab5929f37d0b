"""Informer: list then watch, resume, relist on 410 delivering missed deletes."""

from __future__ import annotations

from typing import Any

from node_agent.informers import Informer
from node_agent.resources import PodInfo
from tests.agent_fakes import FakeKube, make_pod, wait_for


class _Src:
    def __init__(self, kube: FakeKube) -> None:
        self.kube = kube

    def list(self) -> tuple[list[dict[str, Any]], str]:
        return self.kube.list_pods("node-1")

    def watch(self, rv: str, timeout: int) -> Any:
        return self.kube.watch_pods("node-1", rv, timeout)


def _informer(kube: FakeKube, events: list[tuple[str, str]]) -> Informer[PodInfo]:
    def handler(old: PodInfo | None, new: PodInfo | None) -> None:
        kind = "add" if old is None else "delete" if new is None else "update"
        events.append((kind, (new or old).name))  # type: ignore[union-attr]

    return Informer(
        "pods", _Src(kube), PodInfo.from_json, lambda p: p.uid, handler, retry_delay=0.05
    )


def test_list_then_watch_events() -> None:
    kube = FakeKube()
    kube.put_pod(make_pod("ns", "a"))
    kube.put_pod(make_pod("ns", "other-node", node="node-2"))
    events: list[tuple[str, str]] = []
    inf = _informer(kube, events)
    inf.start()
    try:
        assert inf.synced.wait(5)
        assert events == [("add", "a")]
        b = kube.put_pod(make_pod("ns", "b"))
        wait_for(lambda: ("add", "b") in events, what="b added")
        pod = kube.pod(b)
        pod["metadata"]["labels"] = {"x": "y"}
        kube.put_pod(pod)
        wait_for(lambda: ("update", "b") in events, what="b updated")
        kube.delete_pod(b)
        wait_for(lambda: ("delete", "b") in events, what="b deleted")
        assert [p.name for p in inf.items()] == ["a"]
    finally:
        inf.stop()


def test_relist_on_410_delivers_missed_delete_and_add() -> None:
    kube = FakeKube()
    a = kube.put_pod(make_pod("ns", "a"))
    events: list[tuple[str, str]] = []
    inf = _informer(kube, events)
    inf.synced.clear()
    inf.relist()
    assert events == [("add", "a")]
    # Changes made while nobody watched, then the watch is answered with 410 Gone.
    with kube._lock:
        kube.pods.pop(a)
    kube.put_pod(make_pod("ns", "c"))
    kube.expire_next_watch = True
    inf.start()
    try:
        wait_for(lambda: inf.relists >= 2, what="relist after 410")
        wait_for(lambda: ("delete", "a") in events and ("add", "c") in events, what="diff events")
        assert {p.name for p in inf.items()} == {"c"}
    finally:
        inf.stop()


def test_list_errors_retry_until_the_api_is_back() -> None:
    kube = FakeKube()
    kube.put_pod(make_pod("ns", "a"))
    kube.fail_lists = 3
    events: list[tuple[str, str]] = []
    inf = _informer(kube, events)
    inf.start()
    try:
        assert inf.synced.wait(5)
        assert inf.errors == 3 and events == [("add", "a")]
    finally:
        inf.stop()


def test_broken_watch_resumes_from_last_version_without_relisting() -> None:
    kube = FakeKube()
    kube.put_pod(make_pod("ns", "a"))
    events: list[tuple[str, str]] = []
    inf = _informer(kube, events)
    inf.start()
    try:
        assert inf.synced.wait(5)
        kube.fail_watches = 2
        kube.drop_watches()  # the current watch ends; the next two attempts fail
        wait_for(lambda: inf.errors == 2, what="two failed watch attempts")
        kube.put_pod(make_pod("ns", "b"))
        wait_for(lambda: ("add", "b") in events, what="b delivered by the resumed watch")
        assert inf.relists == 1  # never relisted: resumed from the resourceVersion
    finally:
        inf.stop()


def test_stop_wakes_a_watch_blocked_waiting_for_events() -> None:
    """With the source's ``interrupt`` (the real one shuts the watch's socket down), stop()
    ends the informer's thread at once instead of leaving it in a read until the next event
    or the watch's end (the fake's watch would run on for up to 2 s)."""
    kube = FakeKube()
    kube.put_pod(make_pod("ns", "a"))
    inf: Informer[PodInfo] = Informer(
        "pods", _Src(kube), PodInfo.from_json, lambda p: p.uid, lambda old, new: None,
        interrupt=kube.interrupt_watches,
    )  # fmt: skip
    inf.start()
    assert inf.synced.wait(5)
    wait_for(lambda: bool(kube._pod_streams), what="the watch open")
    inf.stop()
    assert inf._thread is not None and not inf._thread.is_alive()
    assert inf.errors == 0  # the wake is not counted as a failure
