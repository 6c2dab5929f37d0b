"""The host probe's pure decisions: which set entries a sync adds and prunes, and when the
saved nat table already holds our rule first in POSTROUTING (issue 17.7)."""

from __future__ import annotations

from node_agent.host_probe import JUMP, insert_first, probe_delta, render_hostprobe, rule_in_place

V4 = render_hostprobe(False)[0]
SNAT = next(ln for ln in V4.splitlines() if ln.startswith("-A ISTIO_POSTRT"))


def test_delta_adds_missing_fixes_owner_prunes_stale_and_keeps_in_flight() -> None:
    members = {"10.0.0.1": "a", "10.0.0.2": "old-owner", "10.0.0.9": "gone", "10.0.0.7": "x"}
    enrolled = {"a": ("10.0.0.1",), "b": ("10.0.0.2", "fd00::2"), "c": ("10.0.0.3",)}
    adds, dels = probe_delta(members, enrolled, keep={"10.0.0.7"})
    assert adds == {"10.0.0.2": "b", "fd00::2": "b", "10.0.0.3": "c"}
    assert dels == ["10.0.0.9"]  # 10.0.0.7 belongs to a pod being enrolled right now
    assert probe_delta({"10.0.0.1": "a"}, {"a": ("10.0.0.1",)}, set()) == ({}, [])


def test_rule_in_place_only_when_first_and_once() -> None:
    assert JUMP in V4 and "-I POSTROUTING 1 -j ISTIO_POSTRT" in insert_first(V4)
    ok = f"*nat\n:POSTROUTING ACCEPT [0:0]\n{JUMP}\n-A POSTROUTING -j KUBE-POSTROUTING\n{SNAT}\n"
    assert rule_in_place(ok, V4)
    behind = f"*nat\n-A POSTROUTING -j KUBE-POSTROUTING\n{JUMP}\n{SNAT}\n"
    assert not rule_in_place(behind, V4)
    twice = f"*nat\n{JUMP}\n{JUMP}\n{SNAT}\n"
    assert not rule_in_place(twice, V4)
    no_snat = f"*nat\n{JUMP}\n"
    assert not rule_in_place(no_snat, V4)
