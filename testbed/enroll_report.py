"""Reading the enrol-under-traffic results (:mod:`testbed.enroll_traffic`): counts per
phase summed over the clients, which log lines are the evidence of a failure, which
failures are ztunnel's drain by design, and the printed table. Pure functions over the
generators' reports and the agent's and stand-in's log records."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from testbed.ztunnel_standin.workloads import DRAIN_SECONDS


def epoch(stamp: Any) -> float:
    """Seconds since the epoch of a log record's ISO time (0.0 when unreadable)."""
    try:
        return datetime.strptime(str(stamp), "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()
    except ValueError:
        return 0.0


def drained_by_ztunnel(
    failure: dict[str, Any], client: str, target: str | None, events: list[dict[str, Any]]
) -> bool:
    """A long-lived connection made *through* ztunnel ends when a proxy it runs through is
    deleted: ztunnel lets it go on for its drain deadline, then closes it (a proxied
    connection cannot outlive its proxy, whatever the CNI does). True when ``failure`` is
    such an end: a fresh long-lived connection, closed within 1 s of the stand-in's "proxy
    drained" for its client or target pod, itself at least the deadline after that pod's
    "proxy stopped" (the Del)."""
    if failure["kind"] != "long" or "(fresh)" not in str(failure["target"]):
        return False
    t = float(failure["time"])
    for pod in (client, target):
        mine = [e for e in events if e["pod"] == pod and e["source"] == "ztunnel-standin"]
        for drained in (e for e in mine if e["msg"] == "proxy drained"):
            if abs(drained["time"] - t) > 1.0:
                continue
            stops = [e["time"] for e in mine
                     if e["msg"] == "proxy stopped" and e["time"] <= drained["time"]]  # fmt: skip
            if stops and drained["time"] - max(stops) >= DRAIN_SECONDS - 0.5:
                return True
    return False


def summarise(reports: dict[str, dict[str, Any]], phases: list[str]) -> dict[str, Any]:
    """Per phase: new-connection and long-lived counts summed over the clients."""
    out: dict[str, Any] = {}
    for phase in phases:
        row: dict[str, Any] = {}
        for kind in ("new", "long"):
            sent = failed = 0
            errors: dict[str, int] = {}
            for rep in reports.values():
                t = rep["phases"].get(phase, {}).get(kind, {})
                sent += t.get("sent", 0)
                failed += t.get("failed", 0)
                for k, v in t.get("errors", {}).items():
                    errors[k] = errors.get(k, 0) + v
            row[kind] = {"sent": sent, "failed": failed, "errors": errors}
        out[phase] = row
    return out


def evidence(failure: dict[str, Any], client: str, events: list[dict[str, Any]],
             ip_names: dict[str, str], window: float = 1.5) -> list[str]:  # fmt: skip
    """The log lines about the failing client and its target within ``window`` seconds."""
    target = ip_names.get(str(failure["target"]).split(" ", 1)[0], "?")
    t = float(failure["time"])
    began = float(failure.get("began") or t)  # a request: from its start to its failure
    return [
        f"{e['time'] - t:+.3f}s {e['source']} {e['pod']}: {e['msg']}"
        + (f" ({e['error']})" if e.get("error") else "")
        for e in events
        if e["pod"] in (client, target) and began - window <= e["time"] <= t + window
    ]


def table(result: dict[str, Any]) -> str:
    """One line per phase: new connections sent/failed, long-lived pings sent/failed."""
    lines = [
        f"{'phase':10} {'requests':>9} {'failed':>7} {'pings':>7} {'failed':>7} {'drained':>8}"
        "  errors (drained: long-lived through a deleted pod's ztunnel, ended at its deadline)"
    ]
    for phase, row in result.get("counts", {}).items():
        errs = {**row["new"]["errors"], **row["long"]["errors"]}
        lines.append(
            f"{phase:10} {row['new']['sent']:9d} {row['new']['failed']:7d} "
            f"{row['long']['sent']:7d} {row['long']['failed']:7d} "
            f"{row['long'].get('drained', 0):8d}  "
            + (", ".join(f"{k} x{v}" for k, v in errs.items()) or "-")
        )
    return "\n".join(lines)
