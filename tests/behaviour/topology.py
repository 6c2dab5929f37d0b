"""A throwaway pod with a peer, a ztunnel stand-in and an app, for real-traffic tests.

``pod`` and ``peer`` are two fresh namespaces joined by a veth pair. Every address lives
only inside them: documentation prefixes (198.51.100.0/24, 2001:db8:7::/64) plus the probe
SNAT addresses on the peer (it plays the node that kubelet's probes come from).

In the pod: the ztunnel stand-in listens on TCP 15001/15006/15008/15053 and UDP 15053 (IPv4
and IPv6) and its own outgoing sockets carry SO_MARK 1337; an app listens on TCP 8080 and,
on loopback only, 9090. On the peer: TCP 80, and DNS on TCP and UDP 53.

On demand (:meth:`Topology.add_vm`), a third namespace ``vm`` plays a VM inside the pod
(KubeVirt style): it reaches the pod through the pod's interface ``virt0``, its default
route points at the pod, and the pod forwards (203.0.113.0/24, 2001:db8:8::/64).
"""

from __future__ import annotations

import re
import socket
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from cni_plugin import constants as c
from cni_plugin.netns import run_in_netns
from tests.behaviour.listeners import ZTUNNEL_MARK, Accepted, Addr, Servers

FAMILIES = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}
POD = {"ipv4": "198.51.100.2", "ipv6": "2001:db8:7::2"}
PEER = {"ipv4": "198.51.100.1", "ipv6": "2001:db8:7::1"}
PREFIX = {"ipv4": 24, "ipv6": 64}
PROBE = {"ipv4": c.HOST_PROBE_SNAT_IPV4, "ipv6": c.HOST_PROBE_SNAT_IPV6}
LOOPBACK = {"ipv4": "127.0.0.1", "ipv6": "::1"}
WILDCARD = {"ipv4": "0.0.0.0", "ipv6": "::"}
ZTUNNEL_TCP_PORTS = (c.ZTUNNEL_OUTBOUND_PORT, c.ZTUNNEL_INBOUND_PORT, c.ZTUNNEL_HBONE_PORT,
                     c.ZTUNNEL_DNS_PORT)  # fmt: skip
APP_PORT = 8080
APP_LOOPBACK_PORT = 9090
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
TIMEOUT_S = 2.0
VIRT_IFACE = "virt0"
VM = {"ipv4": "203.0.113.2", "ipv6": "2001:db8:8::2"}
VM_GATEWAY = {"ipv4": "203.0.113.1", "ipv6": "2001:db8:8::1"}


@dataclass(frozen=True)
class Answer:
    who: str  # the name the answering server gave, e.g. "ztunnel:15001"
    local: Addr  # the client socket's own address (to find the server's record)


def _ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True)


class Topology:
    """Built by :func:`build`; ``close`` stops servers (namespaces belong to the fixture)."""

    def __init__(
        self, pod_ns: str, peer_ns: str, make_netns: Callable[[str], str] | None = None
    ) -> None:
        self.pod_ns, self.peer_ns = pod_ns, peer_ns
        self.pod_path, self.peer_path = f"/run/netns/{pod_ns}", f"/run/netns/{peer_ns}"
        self.vm_path: str | None = None
        self.servers = Servers()
        self._make_netns = make_netns

    def close(self) -> None:
        self.servers.close()

    def ns_path(self, side: str) -> str:
        if side == "vm":
            assert self.vm_path, "add_vm() first"
            return self.vm_path
        return self.pod_path if side == "pod" else self.peer_path

    def address(self, who: str, fam: str) -> str:
        """Address of ``who``: pod, peer, probe (the peer's probe source), loopback or vm."""
        table = {"pod": POD, "peer": PEER, "probe": PROBE, "loopback": LOOPBACK, "vm": VM}[who]
        return table[fam]

    def add_vm(self, bridge: bool = False) -> None:
        """The VM namespace behind the pod's ``virt0`` (once; the fixture removes it). With
        ``bridge``, ``virt0`` is a bridge and the VM's veth end in the pod (``tap0``) one
        of its ports, as KubeVirt's bridge binding has it."""
        if self.vm_path is not None:
            return
        assert self._make_netns is not None, "built without make_netns"
        vm = self._make_netns("vm")
        subprocess.run(["ip", "netns", "exec", vm, "sysctl", "-qw",
                        "net.ipv6.conf.default.accept_dad=0"], check=True)  # fmt: skip
        port = "tap0" if bridge else VIRT_IFACE
        subprocess.run(["ip", "link", "add", port, "netns", self.pod_ns, "type", "veth",
                        "peer", "name", "eth0", "netns", vm], check=True)  # fmt: skip
        if bridge:
            _ip(self.pod_ns, "link", "add", VIRT_IFACE, "type", "bridge", "stp_state", "0")
            _ip(self.pod_ns, "link", "set", port, "master", VIRT_IFACE)
            _ip(self.pod_ns, "link", "set", port, "up")
        for fam in FAMILIES:
            extra = ["nodad"] if fam == "ipv6" else []
            _ip(self.pod_ns, "addr", "add", f"{VM_GATEWAY[fam]}/{PREFIX[fam]}", "dev",
                VIRT_IFACE, *extra)  # fmt: skip
            _ip(vm, "addr", "add", f"{VM[fam]}/{PREFIX[fam]}", "dev", "eth0", *extra)
        _ip(self.pod_ns, "link", "set", VIRT_IFACE, "up")
        _ip(vm, "link", "set", "eth0", "up")
        for fam in FAMILIES:
            six = ["-6"] if fam == "ipv6" else []
            _ip(vm, *six, "route", "add", "default", "via", VM_GATEWAY[fam])
            net = "203.0.113.0/24" if fam == "ipv4" else "2001:db8:8::/64"
            _ip(self.peer_ns, *six, "route", "add", net, "via", POD[fam])
        subprocess.run(["ip", "netns", "exec", self.pod_ns, "sysctl", "-qw",
                        "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"],
                       check=True)  # fmt: skip
        self.vm_path = f"/run/netns/{vm}"

    def _socket(
        self, side: str, fam: str, kind: int, mark: int | None, transparent: bool
    ) -> socket.socket:
        def make() -> socket.socket:
            s = socket.socket(FAMILIES[fam], kind)
            try:
                if mark is not None:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
                if transparent:
                    level = socket.SOL_IP if fam == "ipv4" else socket.IPPROTO_IPV6
                    opt = IP_TRANSPARENT if fam == "ipv4" else IPV6_TRANSPARENT
                    s.setsockopt(level, opt, 1)
                s.settimeout(TIMEOUT_S)
            except BaseException:
                s.close()
                raise
            return s

        return run_in_netns(self.ns_path(side), make)

    def tcp(
        self,
        side: str,
        fam: str,
        dst: Addr,
        *,
        source: str | None = None,
        mark: int | None = None,
        transparent: bool = False,
    ) -> Answer:
        """Connect from ``side`` (pod or peer) to ``dst``, read who answered."""
        with self._socket(side, fam, socket.SOCK_STREAM, mark, transparent) as s:
            if source is not None:
                s.bind((source, 0))
            s.connect(dst)
            local = s.getsockname()
            who = _read_line(s)
            return Answer(who, (str(local[0]), int(local[1])))

    def udp(self, side: str, fam: str, dst: Addr, *, mark: int | None = None) -> Answer:
        with self._socket(side, fam, socket.SOCK_DGRAM, mark, False) as s:
            s.connect(dst)
            s.send(b"query\n")
            data = s.recv(2048)
            local = s.getsockname()
            return Answer(data.decode().strip(), (str(local[0]), int(local[1])))

    def ztunnel_connect(self, fam: str, dst: Addr, spoof_source: str | None = None) -> Answer:
        """A connection made by the ztunnel stand-in itself: SO_MARK 1337, and with
        ``spoof_source`` a transparent socket bound to that (non-local) address, as ztunnel
        does when it forwards an inbound connection to the app."""
        return self.tcp("pod", fam, dst, source=spoof_source, mark=ZTUNNEL_MARK,
                        transparent=spoof_source is not None)  # fmt: skip

    def record_of(self, answer: Answer) -> Accepted:
        """The server-side record of the connection ``answer`` came from."""
        found = self.servers.find(answer.local)
        assert found, f"no server recorded a connection from {answer.local}"
        return found[-1]


def _read_line(s: socket.socket) -> str:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(256)
        if not chunk:
            break
        buf += chunk
    return buf.decode().strip()


def build(make_netns: Callable[[str], str]) -> Topology:
    """Create the two namespaces, the veth, addresses, routes and all listeners."""
    pod, peer = make_netns("pod"), make_netns("peer")
    for ns in (pod, peer):
        # No duplicate address detection: link-local addresses (and their routes) exist as
        # soon as the link is up, instead of appearing a second later in the middle of a
        # test that compares the namespace before and after.
        subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw",
                        "net.ipv6.conf.default.accept_dad=0"], check=True)  # fmt: skip
    subprocess.run(["ip", "link", "add", "eth0", "netns", pod, "type", "veth",
                    "peer", "name", "eth0", "netns", peer], check=True)  # fmt: skip
    for ns, who in ((pod, POD), (peer, PEER)):
        for fam in FAMILIES:
            extra = ["nodad"] if fam == "ipv6" else []
            _ip(ns, "addr", "add", f"{who[fam]}/{PREFIX[fam]}", "dev", "eth0", *extra)
        _ip(ns, "link", "set", "eth0", "up")
    # The peer also stands for the node: kubelet's probes arrive from the probe addresses.
    _ip(peer, "addr", "add", f"{PROBE['ipv4']}/32", "dev", "eth0")
    _ip(peer, "addr", "add", f"{PROBE['ipv6']}/128", "dev", "eth0", "nodad")
    _ip(pod, "route", "add", f"{PROBE['ipv4']}/32", "dev", "eth0")
    _ip(pod, "route", "add", f"{PROBE['ipv6']}/128", "dev", "eth0")
    topo = Topology(pod, peer, make_netns)
    try:
        srv = topo.servers
        for fam, af in FAMILIES.items():
            any_addr = WILDCARD[fam]
            for port in ZTUNNEL_TCP_PORTS:
                srv.listen(topo.pod_path, f"ztunnel:{port}", "tcp", af, any_addr, port)
            # ztunnel's DNS proxy listens on loopback: a UDP answer must leave from the
            # address REDIRECT chose (127.0.0.1 / ::1) for conntrack to undo the NAT.
            dns = c.ZTUNNEL_DNS_PORT
            srv.listen(topo.pod_path, f"ztunnel:{dns}", "udp", af, LOOPBACK[fam], dns)
            srv.listen(topo.pod_path, f"app:{APP_PORT}", "tcp", af, any_addr, APP_PORT)
            srv.listen(topo.pod_path, f"app-lo:{APP_LOOPBACK_PORT}", "tcp", af, LOOPBACK[fam],
                       APP_LOOPBACK_PORT)  # fmt: skip
            srv.listen(topo.peer_path, "peer:80", "tcp", af, any_addr, 80)
            srv.listen(topo.peer_path, "peer-dns:53", "tcp", af, any_addr, 53)
            srv.listen(topo.peer_path, "peer-dns:53", "udp", af, any_addr, 53)
    except BaseException:
        topo.close()
        raise
    return topo


def snapshot(netns_path: str) -> dict[str, str]:
    """Everything redirection may touch in a namespace, normalised: xtables (legacy, both
    families), the nftables ruleset (which includes iptables-nft), policy rules and all
    route tables. Empty legacy xtables holding only built-in chains with policy ACCEPT are
    dropped: they behave exactly like absent ones, and legacy xtables can never unregister
    them. nf_tables tables are kept as they are, empty or not: a table ``apply`` created
    must be gone after ``remove``."""

    return run_in_netns(netns_path, read_state)


def read_state() -> dict[str, str]:
    """:func:`snapshot` of the namespace the calling thread is in."""
    out = {}
    for name, argv in SNAPSHOT_COMMANDS.items():
        done = subprocess.run(argv, capture_output=True, text=True)
        out[name] = done.stdout if done.returncode == 0 else f"<{done.stderr.strip()}>"
    out["iptables-legacy-save"] = _normalise_save(out["iptables-legacy-save"])
    out["ip6tables-legacy-save"] = _normalise_save(out["ip6tables-legacy-save"])
    out["nft"] = _normalise_nft(out["nft"])
    return out


SNAPSHOT_COMMANDS = {
    "iptables-legacy-save": ["iptables-legacy-save"],
    "ip6tables-legacy-save": ["ip6tables-legacy-save"],
    "nft": ["nft", "list", "ruleset"],
    "ip rule": ["ip", "rule"],
    "ip -6 rule": ["ip", "-6", "rule"],
    "ip route": ["ip", "route", "show", "table", "all"],
    "ip -6 route": ["ip", "-6", "route", "show", "table", "all"],
}


def _normalise_save(text: str) -> str:
    tables: list[list[str]] = []
    for raw in text.splitlines():
        line = raw.split(" [")[0] if raw.startswith(":") else raw  # drop counters
        if line.startswith("#"):
            continue
        if line.startswith("*"):
            tables.append([])
        if tables:
            tables[-1].append(line)
    kept = [t for t in tables if not _empty_xtable(t)]
    return "\n".join("\n".join(t) for t in kept)


def _empty_xtable(lines: list[str]) -> bool:
    body = [ln for ln in lines[1:] if ln != "COMMIT"]
    return all(ln.startswith(":") and ln.endswith(" ACCEPT") for ln in body)


def _normalise_nft(text: str) -> str:
    # Counters move with every packet (IPv6 neighbour discovery, for one): not state.
    return re.sub(r"counter packets \d+ bytes \d+", "counter", text)
