"""Real connections through each backend's redirection (cases 1-8 of the behaviour table)."""

from __future__ import annotations

import pytest

from cni_plugin.redirection.settings import RedirectSettings
from tests.behaviour.backends import BackendCase
from tests.behaviour.cases import DEFAULT, TRAFFIC_CASES, TrafficCase
from tests.behaviour.listeners import ZTUNNEL_MARK
from tests.behaviour.topology import APP_PORT, Answer, Topology

pytestmark = pytest.mark.netns

FAMILIES = ["ipv4", "ipv6"]


def _send(topo: Topology, case: TrafficCase, fam: str) -> Answer:
    dst = (topo.address(case.dst, fam), case.port)
    if case.proto == "udp":
        side = "vm" if case.src == "vm" else "pod"
        return topo.udp(side, fam, dst, mark=ZTUNNEL_MARK if case.src == "ztunnel" else None)
    if case.src == "probe":
        return topo.tcp("peer", fam, dst, source=topo.address("probe", fam))
    if case.src == "ztunnel":
        return topo.ztunnel_connect(fam, dst)
    return topo.tcp(case.src, fam, dst)


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("case", TRAFFIC_CASES, ids=[c.id for c in TRAFFIC_CASES])
def test_traffic(
    request: pytest.FixtureRequest,
    backend_case: BackendCase,
    topology: Topology,
    case: TrafficCase,
    fam: str,
) -> None:
    gap = backend_case.known_gaps.get(case.id)
    if gap:
        request.applymarker(pytest.mark.xfail(reason=f"known gap: {gap}", strict=True))
    if case.src == "vm":
        topology.add_vm(case.vm_bridge)  # before apply: the backend sees the interfaces
    if case.apply:
        backend_case.build().apply(topology.pod_path, RedirectSettings(**case.settings))
    answer = _send(topology, case, fam)
    assert answer.who == case.expect, f"{case.what}: answered by {answer.who}"
    record = topology.record_of(answer)
    assert record.listener == case.expect
    if case.orig_dst is not None:
        want = (topology.address(case.orig_dst, fam), case.port)
        assert record.original_dst == want, f"{case.what}: original destination"


@pytest.mark.parametrize("fam", FAMILIES)
def test_inbound_reply_returns_through_connmark_and_table_100(
    backend_case: BackendCase, topology: Topology, fam: str
) -> None:
    """7: ztunnel accepts a captured inbound connection, then connects to the app from the
    client's own address (transparent socket, SO_MARK 1337). The app's replies go to a
    non-local address; only the connmark restore and the table-100 local route bring them
    back to ztunnel (otherwise they leave on the veth and the peer resets them)."""
    backend_case.build().apply(topology.pod_path, RedirectSettings(**DEFAULT))
    pod, peer = topology.address("pod", fam), topology.address("peer", fam)
    inbound = topology.tcp("peer", fam, (pod, APP_PORT))
    accepted = topology.record_of(inbound)
    assert accepted.listener == "ztunnel:15006"
    assert accepted.original_dst == (pod, APP_PORT)

    forwarded = topology.ztunnel_connect(fam, accepted.original_dst, spoof_source=peer)
    assert forwarded.who == f"app:{APP_PORT}"
    app_view = topology.record_of(forwarded)
    assert app_view.client[0] == peer, "the app must see the original client address"
    assert ZTUNNEL_MARK == 0x539
