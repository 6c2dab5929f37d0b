"""The enrol-under-traffic report: per-phase sums over clients, and which failures are
ztunnel's drain by design (only a fresh long-lived connection, ended right at a pod's drain
deadline after its Del) rather than failures."""

from __future__ import annotations

from typing import Any

from testbed.enroll_report import drained_by_ztunnel, epoch, summarise
from testbed.ztunnel_standin.workloads import DRAIN_SECONDS


def _ev(t: float, pod: str, msg: str) -> dict[str, Any]:
    return {"time": t, "source": "ztunnel-standin", "pod": pod, "msg": msg}


def test_a_fresh_connection_ending_at_the_drain_deadline_is_by_design_nothing_else() -> None:
    events = [
        _ev(100.0, "srv-0", "proxy stopped"),
        _ev(100.0 + DRAIN_SECONDS, "srv-0", "proxy drained"),
    ]
    fresh = {"kind": "long", "target": "10.0.0.2 (fresh)", "time": 100.0 + DRAIN_SECONDS + 0.2}
    assert drained_by_ztunnel(fresh, "cli-0", "srv-0", events)
    assert not drained_by_ztunnel(
        {**fresh, "target": "10.0.0.2 (pinned)"}, "cli-0", "srv-0", events
    )
    assert not drained_by_ztunnel({**fresh, "kind": "request"}, "cli-0", "srv-0", events)
    assert not drained_by_ztunnel({**fresh, "time": 101.0}, "cli-0", "srv-0", events)  # mid-drain
    early = [_ev(100.0, "srv-0", "proxy stopped"), _ev(100.5, "srv-0", "proxy drained")]
    assert not drained_by_ztunnel({**fresh, "time": 100.6}, "cli-0", "srv-0", early)


def test_counts_are_summed_over_clients_per_phase() -> None:
    rep = {"phases": {"label": {"new": {"sent": 3, "failed": 1, "errors": {"connect: x": 1}},
                                "long": {"sent": 2, "failed": 0, "errors": {}}}}}  # fmt: skip
    out = summarise({"cli-0": rep, "cli-1": rep}, ["label", "unlabel"])
    assert out["label"]["new"] == {"sent": 6, "failed": 2, "errors": {"connect: x": 2}}
    assert out["unlabel"]["long"] == {"sent": 0, "failed": 0, "errors": {}}
    assert epoch("2026-12-04T20:00:00.250Z") % 1 == 0.25 and epoch("garbage") == 0.0
