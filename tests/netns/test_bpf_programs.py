"""Program-level tests: the tc programs run through BPF_PROG_TEST_RUN on crafted packets,
inside a throwaway namespace, asserting verdicts, rewritten fields and checksums, the
0x111 mark, and the NAT map entries. Every pin lives under a per-test directory that is
removed afterwards (the getsockopt link detaches with it)."""

from __future__ import annotations

import ipaddress
import secrets
import shutil
import socket
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cni_plugin import constants as c
from cni_plugin.bpf import image, programs, syscall
from cni_plugin.bpf.availability import cgroup2_root
from cni_plugin.netns import run_in_netns
from cni_plugin.redirection.settings import RedirectSettings
from tests.netns import bpf_packets as pk
from tests.netns.bpf_support import CACHE_DIR, skip_if_unavailable

pytestmark = pytest.mark.netns

TC_ACT_UNSPEC = 0xFFFFFFFF
TC_ACT_SHOT = 2
TC_ACT_REDIRECT = 7
POD4, PEER4 = "198.51.100.2", "198.51.100.1"
POD6, PEER6 = "2001:db8:7::2", "2001:db8:7::1"


class Harness:
    """The programs of one settings variant, run inside the test namespace."""

    def __init__(self, ns: str, pin_root: Path, img: image.ProgramImage) -> None:
        self.path = f"/run/netns/{ns}"
        self.pin_root = pin_root
        self.img = img
        self.node = programs.node_objects(img, pin_root, cgroup2_root())
        self.eth0 = int(
            subprocess.run(["ip", "-n", ns, "-o", "link", "show", "eth0"], check=True,
                           capture_output=True, text=True).stdout.split(":")[0]
        )  # fmt: skip
        self.variants: list[programs.Pinned] = []

    def variant(self, *, inbound_nat: bool = False, **settings: object) -> programs.Pinned:
        wanted = RedirectSettings(**settings)  # type: ignore[arg-type]
        v = programs.variant_objects(self.img, wanted, self.pin_root, self.node, inbound_nat)
        self.variants.append(v)
        return v

    def run(
        self, v: programs.Pinned, prog: str, data: bytes, mark: int = 0, ifindex: int = 0
    ) -> syscall.TestRun:
        ctx = pk.skb_ctx(mark, ifindex)
        return run_in_netns(self.path, lambda: syscall.prog_test_run(v.fds[prog], data, ctx))

    def nat(
        self, fam: int, proto: int, addr: str, port: int, local: str | None = None
    ) -> tuple[str, int, int] | None:
        pod = ipaddress.ip_address(local).packed if local else b""
        raw = programs.nat_entry(
            self.node, fam, proto, ipaddress.ip_address(addr).packed, socket.htons(port), pod
        )
        if raw is None:
            return None
        a, p, target, _sport, _pad, _created = struct.unpack(programs.NAT_VAL_FORMAT, raw)
        n = 4 if fam == 4 else 16
        return str(ipaddress.ip_address(a[:n])), socket.ntohs(p), target

    def close(self) -> None:
        for v in self.variants:
            v.close()
        self.node.close()


@pytest.fixture
def harness(make_netns: Callable[[str], str]) -> Iterator[Harness]:
    skip_if_unavailable()
    ns = make_netns("bpfprog")
    subprocess.run(["ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name",
                    "veth1"], check=True)  # fmt: skip
    pin_root = Path(f"/sys/fs/bpf/icnit-prog-{secrets.token_hex(4)}")
    h: Harness | None = None
    try:
        h = Harness(ns, pin_root, image.load_image(CACHE_DIR))
        yield h
    finally:
        if h is not None:
            h.close()
        shutil.rmtree(pin_root, ignore_errors=True)
    assert not pin_root.exists()


def test_outbound_syn_goes_to_loopback_15001_marked_and_recorded(harness: Harness) -> None:
    v = harness.variant()
    r = harness.run(v, "istio_egress", pk.frame(POD4, PEER4, 40000, 80))
    assert r.retval == TC_ACT_REDIRECT
    out = pk.parse(r.data)
    assert out.dst_mac == b"\0" * 6, "lo only takes frames addressed to its zero MAC"
    assert (out.src, out.sport, out.dst, out.dport) == (POD4, 40000, "127.0.0.1", 15001)
    assert out.l3_ok and out.l4_ok
    assert pk.ctx_mark(r.ctx) & c.MARK_MASK == c.CONNMARK
    assert harness.nat(4, socket.IPPROTO_TCP, POD4, 40000) == (PEER4, 80, 15001)
    # A later packet of the same conversation follows the recorded NAT entry.
    later = harness.run(v, "istio_egress", pk.frame(POD4, PEER4, 40000, 80, flags=pk.ACK))
    assert later.retval == TC_ACT_REDIRECT
    assert pk.parse(later.data).dport == 15001
    # ...but a non-SYN packet of a conversation we never saw is left alone.
    other = pk.frame(POD4, PEER4, 40001, 80, flags=pk.ACK)
    left = harness.run(v, "istio_egress", other)
    assert left.retval == TC_ACT_UNSPEC and left.data == other


def test_outbound_ipv6_goes_to_loopback_15001(harness: Harness) -> None:
    v = harness.variant()
    r = harness.run(v, "istio_egress", pk.frame(POD6, PEER6, 40000, 443))
    assert r.retval == TC_ACT_REDIRECT
    out = pk.parse(r.data)
    assert (out.dst, out.dport) == ("::1", 15001) and out.l4_ok
    assert harness.nat(6, socket.IPPROTO_TCP, POD6, 40000) == (PEER6, 443, 15001)


def test_ipv6_untouched_when_disabled(harness: Harness) -> None:
    v = harness.variant(ipv6=False)
    frame = pk.frame(POD6, PEER6, 40000, 443)
    r = harness.run(v, "istio_egress", frame)
    assert r.retval == TC_ACT_UNSPEC and r.data == frame


@pytest.mark.parametrize(
    ("what", "frame", "mark"),
    [
        ("ztunnel-marked", pk.frame(POD4, PEER4, 40000, 80), c.ZTUNNEL_MARK),
        ("to-probe-address", pk.frame(POD4, c.HOST_PROBE_SNAT_IPV4, 40000, 80), 0),
        ("to-v6-probe", pk.frame(POD6, c.HOST_PROBE_SNAT_IPV6, 40000, 80), 0),
        ("udp-not-dns", pk.frame(POD4, PEER4, 40000, 5353, proto="udp"), 0),
        ("ztunnel-dns-upstream", pk.frame(POD4, PEER4, 40000, 53, proto="udp"), 0x539),
    ],
)
def test_egress_leaves_alone(harness: Harness, what: str, frame: bytes, mark: int) -> None:
    r = harness.run(harness.variant(), "istio_egress", frame, mark=mark)
    assert r.retval == TC_ACT_UNSPEC, what
    assert r.data == frame, what


@pytest.mark.parametrize("proto", ["udp", "tcp"])
def test_dns_goes_to_15053_when_captured(harness: Harness, proto: str) -> None:
    r = harness.run(harness.variant(), "istio_egress", pk.frame(POD4, PEER4, 40000, 53, proto))
    assert r.retval == TC_ACT_REDIRECT
    out = pk.parse(r.data)
    assert (out.dst, out.dport) == ("127.0.0.1", 15053) and out.l4_ok and out.l3_ok
    pnum = socket.IPPROTO_UDP if proto == "udp" else socket.IPPROTO_TCP
    assert harness.nat(4, pnum, POD4, 40000) == (PEER4, 53, 15053)


def test_dns_off_udp_untouched_and_tcp_is_plain_outbound(harness: Harness) -> None:
    v = harness.variant(dns_capture=False)
    udp = pk.frame(POD4, PEER4, 40000, 53, "udp")
    r = harness.run(v, "istio_egress", udp)
    assert r.retval == TC_ACT_UNSPEC and r.data == udp
    t = harness.run(v, "istio_egress", pk.frame(POD4, PEER4, 40001, 53))
    assert t.retval == TC_ACT_REDIRECT and pk.parse(t.data).dport == 15001


@pytest.mark.parametrize(("fam", "pod", "peer"), [(4, POD4, PEER4), (6, POD6, PEER6)])
def test_reply_from_ztunnel_gets_original_source_back(
    harness: Harness, fam: int, pod: str, peer: str
) -> None:
    v = harness.variant()
    harness.run(v, "istio_egress", pk.frame(pod, peer, 40000, 80))  # records the NAT entry
    lo = "127.0.0.1" if fam == 4 else "::1"
    reply = pk.frame(lo, pod, 15001, 40000, flags=pk.SYN | pk.ACK)
    r = harness.run(v, "istio_ingress", reply, mark=c.ZTUNNEL_MARK, ifindex=1)
    assert r.retval == TC_ACT_UNSPEC
    out = pk.parse(r.data)
    assert (out.src, out.sport, out.dst, out.dport) == (peer, 80, pod, 40000)
    assert out.l3_ok and out.l4_ok
    # The same reply on a pod interface (not lo) is not ours to rewrite.
    r2 = harness.run(v, "istio_ingress", reply, ifindex=harness.eth0)
    assert r2.data == reply


def test_syn_whose_port_is_claimed_gets_another_and_keeps_it(harness: Harness) -> None:
    """Issue 19: two SYNs from one client port to two destinations. The first one's fresh
    record claims the port's tuple at 15001, so the second gets another source port; its
    later packets keep it, the replies give the client its own port back, and the first
    conversation is untouched."""
    v = harness.variant()
    before = v.counters()["port_remap"]
    first = harness.run(v, "istio_egress", pk.frame(POD4, PEER4, 40000, 80))
    assert pk.parse(first.data).sport == 40000
    second = harness.run(v, "istio_egress", pk.frame(POD4, PEER4, 40000, 81))
    assert second.retval == TC_ACT_REDIRECT
    out = pk.parse(second.data)
    given = out.sport
    assert given != 40000 and 32768 <= given < 61000, given
    assert (out.dst, out.dport) == ("127.0.0.1", 15001) and out.l3_ok and out.l4_ok
    assert v.counters()["port_remap"] == before + 1
    assert harness.nat(4, socket.IPPROTO_TCP, POD4, given) == (PEER4, 81, 15001)
    assert harness.nat(4, socket.IPPROTO_TCP, POD4, 40000) == (PEER4, 80, 15001)
    for dport, sport in ((81, given), (80, 40000)):
        later = harness.run(v, "istio_egress", pk.frame(POD4, PEER4, 40000, dport, flags=pk.ACK))
        assert later.retval == TC_ACT_REDIRECT
        assert pk.parse(later.data).sport == sport, f"later packet to :{dport}"
    # A retransmission of the second SYN keeps the port it was given.
    again = harness.run(v, "istio_egress", pk.frame(POD4, PEER4, 40000, 81))
    assert pk.parse(again.data).sport == given
    reply = pk.frame("127.0.0.1", POD4, 15001, given, flags=pk.SYN | pk.ACK)
    r = harness.run(v, "istio_ingress", reply, mark=c.ZTUNNEL_MARK, ifindex=1)
    back = pk.parse(r.data)
    assert (back.src, back.sport, back.dst, back.dport) == (PEER4, 81, POD4, 40000)
    assert back.l3_ok and back.l4_ok


def test_inbound_syn_without_listener_is_dropped_not_delivered(harness: Harness) -> None:
    v = harness.variant()
    before = v.counters()["no_listener"]
    r = harness.run(v, "istio_ingress", pk.frame(PEER4, POD4, 50000, 8080), ifindex=harness.eth0)
    assert r.retval == TC_ACT_SHOT
    assert v.counters()["no_listener"] == before + 1


@pytest.mark.parametrize(
    ("what", "frame", "mark", "settings"),
    [
        ("hbone", pk.frame(PEER4, POD4, 50000, c.ZTUNNEL_HBONE_PORT), 0, {}),
        ("from-probe", pk.frame(c.HOST_PROBE_SNAT_IPV4, POD4, 50000, 8080), 0, {}),
        ("from-v6-probe", pk.frame(c.HOST_PROBE_SNAT_IPV6, POD6, 50000, 8080), 0, {}),
        ("bypass-inbound", pk.frame(PEER4, POD4, 50000, 8080), 0, {"bypass_inbound": True}),
        ("ztunnel-marked", pk.frame(PEER4, POD4, 50000, 8080), c.ZTUNNEL_MARK, {}),
        ("not-a-syn", pk.frame(PEER4, POD4, 50000, 8080, flags=pk.ACK), 0, {}),
        ("to-loopback", pk.frame("127.0.0.1", "127.0.0.1", 50000, 8080), 0, {}),
    ],
)
def test_ingress_leaves_alone(
    harness: Harness, what: str, frame: bytes, mark: int, settings: dict[str, object]
) -> None:
    v = harness.variant(**settings)  # type: ignore[arg-type]
    r = harness.run(v, "istio_ingress", frame, mark=mark, ifindex=harness.eth0)
    assert r.retval == TC_ACT_UNSPEC, what
    assert r.data == frame, what


def test_lo_syn_to_own_address_is_not_captured(harness: Harness) -> None:
    """The app calling its own pod address: iptables decides in nat OUTPUT (`-o lo` ACCEPT)
    and never consults PREROUTING for it, so it reaches the app, not 15006."""
    frame = pk.frame(POD4, POD4, 40000, 8080)
    r = harness.run(harness.variant(), "istio_ingress", frame, ifindex=1)
    assert r.retval == TC_ACT_UNSPEC and r.data == frame


def test_lo_tcp53_to_own_address_goes_to_15053(harness: Harness) -> None:
    r = harness.run(harness.variant(), "istio_ingress", pk.frame(POD4, POD4, 40000, 53),
                    ifindex=1)  # fmt: skip
    assert r.retval == TC_ACT_REDIRECT
    out = pk.parse(r.data)
    assert (out.dst, out.dport) == ("127.0.0.1", 15053) and out.l4_ok


def test_settings_map_layout_matches_header(harness: Harness) -> None:
    v = harness.variant(bypass_inbound=True)
    raw = syscall.map_lookup(v.fds["cfg"], struct.pack("<I", 0), 32)
    assert raw is not None
    flags, probe4, probe6, version, _ = struct.unpack(programs.SETTINGS_FORMAT, raw)
    assert flags == programs.F_DNS_CAPTURE | programs.F_BYPASS_INBOUND | programs.F_IPV6
    assert struct.pack("<I", probe4) == ipaddress.IPv4Address(c.HOST_PROBE_SNAT_IPV4).packed
    assert probe6 == ipaddress.IPv6Address(c.HOST_PROBE_SNAT_IPV6).packed
    assert version == harness.img.version


def test_inbound_by_port_rewrite_where_sk_assign_refuses_reuseport(harness: Harness) -> None:
    """The Linux < 6.5 path (forced here): the SYN keeps the pod address and gets port
    15006, later packets follow, and ztunnel's (marked) replies leave with port 8080."""
    v = harness.variant(inbound_nat=True)

    def listen() -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("0.0.0.0", 15006))
        s.listen(1)
        return s

    with run_in_netns(harness.path, listen):
        syn = harness.run(v, "istio_ingress", pk.frame(PEER4, POD4, 50000, 8080),
                          ifindex=harness.eth0)  # fmt: skip
        assert syn.retval == TC_ACT_UNSPEC
        out = pk.parse(syn.data)
        assert (out.dst, out.dport) == (POD4, 15006) and out.l4_ok
        assert harness.nat(4, socket.IPPROTO_TCP, PEER4, 50000, POD4) == (POD4, 8080, 15006)
        later = harness.run(v, "istio_ingress", pk.frame(PEER4, POD4, 50000, 8080, flags=pk.ACK),
                            ifindex=harness.eth0)  # fmt: skip
        assert pk.parse(later.data).dport == 15006
        reply = pk.frame(POD4, PEER4, 15006, 50000, flags=pk.SYN | pk.ACK)
        r = harness.run(v, "istio_egress", reply, mark=c.ZTUNNEL_MARK)
        assert r.retval == TC_ACT_UNSPEC
        back = pk.parse(r.data)
        assert (back.src, back.sport, back.dst, back.dport) == (POD4, 8080, PEER4, 50000)
        assert back.l4_ok
    # Without a listener the SYN is dropped, as on the sk_assign path.
    gone = harness.run(v, "istio_ingress", pk.frame(PEER4, POD4, 50001, 8080),
                       ifindex=harness.eth0)  # fmt: skip
    assert gone.retval == TC_ACT_SHOT


VM4, VIRT4 = "203.0.113.2", "203.0.113.1"
VM6, VIRT6 = "2001:db8:8::2", "2001:db8:8::1"


def _virt(harness: Harness, v: programs.Pinned, a4: str | None, a6: str | None) -> programs.Pinned:
    """A pod's own istio_virt_ingress with eth0 as its virtual interface."""
    own = programs.virt_objects(harness.img, v, harness.node, {harness.eth0: (a4, a6)})
    harness.variants.append(own)
    return own


@pytest.mark.parametrize(("fam", "vm", "virt", "peer"),
                         [(4, VM4, VIRT4, PEER4), (6, VM6, VIRT6, PEER6)])  # fmt: skip
def test_virtual_interface_tcp_goes_to_its_own_address_15001(
    harness: Harness, fam: int, vm: str, virt: str, peer: str
) -> None:
    v = harness.variant()
    own = _virt(harness, v, VIRT4, VIRT6)
    before = v.counters()["virtual"]
    r = harness.run(own, "istio_virt_ingress", pk.frame(vm, peer, 40000, 80),
                    ifindex=harness.eth0)  # fmt: skip
    assert r.retval == TC_ACT_UNSPEC, "delivered by ordinary routing: the address is local"
    out = pk.parse(r.data)
    assert (out.src, out.sport, out.dst, out.dport) == (vm, 40000, virt, 15001)
    assert out.l3_ok and out.l4_ok
    assert harness.nat(fam, socket.IPPROTO_TCP, vm, 40000) == (peer, 80, 15001)
    assert v.counters()["virtual"] == before + 1  # the variant's counters are shared
    # Later packets follow; a conversation we never saw, and UDP, are left alone.
    later = harness.run(own, "istio_virt_ingress", pk.frame(vm, peer, 40000, 80, flags=pk.ACK),
                        ifindex=harness.eth0)  # fmt: skip
    assert pk.parse(later.data).dport == 15001
    for untouched in (pk.frame(vm, peer, 40001, 80, flags=pk.ACK),
                      pk.frame(vm, peer, 40002, 53, proto="udp")):  # fmt: skip
        left = harness.run(own, "istio_virt_ingress", untouched, ifindex=harness.eth0)
        assert left.retval == TC_ACT_UNSPEC and left.data == untouched
    # An interface not in the pod's map (here lo) is not a virtual one.
    lo = harness.run(own, "istio_virt_ingress", pk.frame(vm, peer, 40003, 80), ifindex=1)
    assert lo.data == pk.frame(vm, peer, 40003, 80)
    # ztunnel's answer leaves through the interface with the peer's address back.
    reply = pk.frame(virt, vm, 15001, 40000, flags=pk.SYN | pk.ACK)
    back = harness.run(v, "istio_egress", reply, mark=c.ZTUNNEL_MARK)
    assert back.retval == TC_ACT_UNSPEC
    out = pk.parse(back.data)
    assert (out.src, out.sport, out.dst, out.dport) == (peer, 80, vm, 40000)
    assert out.l3_ok and out.l4_ok


def test_virtual_interface_without_an_address_drops_the_syn(harness: Harness) -> None:
    # As REDIRECT does when the receiving interface has no address of the family.
    own = _virt(harness, harness.variant(), VIRT4, None)
    r6 = harness.run(own, "istio_virt_ingress", pk.frame(VM6, PEER6, 40000, 80),
                     ifindex=harness.eth0)  # fmt: skip
    assert r6.retval == TC_ACT_SHOT
    r4 = harness.run(own, "istio_virt_ingress", pk.frame(VM4, PEER4, 40000, 80),
                     ifindex=harness.eth0)  # fmt: skip
    assert r4.retval == TC_ACT_UNSPEC and pk.parse(r4.data).dst == VIRT4
