"""Issue 19: joining and leaving the mesh under traffic, per backend, without a failed request.

Runs :func:`testbed.enroll_traffic.run` (its own node, ``enroll<pid>``): four servers and two
clients under continuous traffic (new connections and long-lived ones) while the namespace is
labelled, unlabelled, labelled again, and one server opts out and back in. Every phase must
have carried traffic (the generators really ran) and none may have a failed connect, request
or long-lived ping. On failure the message lists each failure with the agent's and the
stand-in's log lines about the two pods around it.
"""

from __future__ import annotations

import os

import pytest

from testbed.enroll_report import table
from testbed.enroll_traffic import PHASES, run
from testbed.mesh import missing_pieces

pytestmark = [pytest.mark.testbed, pytest.mark.timeout(900)]


@pytest.mark.parametrize("backend", ["iptables", "nftables", "ebpf"])
def test_enroll_and_leave_under_traffic_fails_nothing(backend: str) -> None:
    if missing_pieces():
        pytest.skip(f"--mesh pieces not landed: {missing_pieces()}")
    result = run(backend, f"enroll{os.getpid()}")
    print(f"\n{backend} ({result['seconds']}s, load {result['loadavg']}):\n{table(result)}")
    for variant, counters in result.get("bpf_counters", {}).items():
        print(f"ebpf counters {variant}: {counters}")
    assert result["down_problems"] == [] and result["leftovers"] == []
    counts = result["counts"]
    assert list(counts) == PHASES
    for phase, row in counts.items():
        # Each phase carried traffic of both kinds: a phase without requests proves nothing.
        assert row["new"]["sent"] >= 20 and row["long"]["sent"] >= 20, (phase, row)
    # Both enrolment states were really reached (the annotations and the stand-in's proxies).
    msgs = {(e["source"], e["msg"]) for e in result["timeline"]}
    assert ("ztunnel-standin", "proxy started") in msgs
    assert ("ztunnel-standin", "proxy stopped") in msgs
    report = "\n".join(
        f"{f['phase']}: {f['client']} -> {f['target_pod']} {f['kind']}: {f['error']}\n    "
        + "\n    ".join(f["evidence"])
        for f in result["failures"]
        if not f["by_design"]
    )
    # Only a connection made through ztunnel, to or from a pod that then left, may end, and
    # only at ztunnel's drain deadline after that pod's Del (testbed.enroll_traffic).
    drained = {p for p, r in counts.items() if r["long"].get("drained")}
    assert drained <= {"unlabel", "opt-out"}, drained
    failed = {p: (r["new"]["failed"], r["long"]["failed"]) for p, r in counts.items()}
    assert all(n == 0 and m == 0 for n, m in failed.values()), f"{failed}\n{report}"
