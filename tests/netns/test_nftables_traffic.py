"""Real TCP through the nftables rules: a pod namespace wired to a peer by a veth pair.

Each case opens real sockets inside the namespaces and checks which listener accepts the
connection and what original destination ztunnel would recover (SO_ORIGINAL_DST).
The shared behaviour table (tests/behaviour) covers more; these guard the backend alone.
"""

from __future__ import annotations

import socket
import struct
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from cni_plugin.netns import run_in_netns
from cni_plugin.redirection.nftables_backend import NftablesBackend
from cni_plugin.redirection.settings import RedirectSettings

pytestmark = pytest.mark.netns

POD_IP, PEER_IP = "10.231.7.2", "10.231.7.1"
POD_IP6, PEER_IP6 = "fd00:231:7::2", "fd00:231:7::1"
SO_ORIGINAL_DST = 80  # also IP6T_SO_ORIGINAL_DST, at SOL_IPV6
ZTUNNEL_MARK = 0x539


@dataclass
class Pod:
    pod: str
    peer: str

    def sock(self, ns: str, mark: int | None = None, v6: bool = False) -> socket.socket:
        """A TCP socket created inside ``ns`` (it stays in that namespace)."""

        def make() -> socket.socket:
            s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM)
            if v6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.settimeout(2)
            if mark is not None:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
            return s

        return run_in_netns(f"/run/netns/{ns}", make)

    def listen(self, ns: str, addr: str, port: int) -> socket.socket:
        s = self.sock(ns, v6=":" in addr)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, port))
        s.listen(4)
        return s


@pytest.fixture
def pod(make_netns: Callable[[str], str]) -> Iterator[Pod]:
    p, q = make_netns("pod"), make_netns("peer")
    for cmd in (
        ["ip", "-n", p, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", q],
        ["ip", "-n", p, "addr", "add", f"{POD_IP}/24", "dev", "eth0"],
        ["ip", "-n", q, "addr", "add", f"{PEER_IP}/24", "dev", "eth0"],
        ["ip", "-n", q, "addr", "add", "169.254.7.127/32", "dev", "eth0"],
        ["ip", "-n", p, "link", "set", "eth0", "up"],
        ["ip", "-n", q, "link", "set", "eth0", "up"],
        ["ip", "-n", p, "route", "add", "169.254.7.127/32", "dev", "eth0"],
        ["ip", "-n", p, "addr", "add", f"{POD_IP6}/64", "dev", "eth0", "nodad"],
        ["ip", "-n", q, "addr", "add", f"{PEER_IP6}/64", "dev", "eth0", "nodad"],
    ):
        subprocess.run(cmd, check=True)
    backend = NftablesBackend()
    settings = RedirectSettings(ipv6=True)
    backend.apply(f"/run/netns/{p}", settings)
    yield Pod(p, q)
    backend.remove(f"/run/netns/{p}", settings)


def original_dst(conn: socket.socket) -> tuple[str, int]:
    if conn.family == socket.AF_INET6:
        raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
        port, addr6 = struct.unpack_from("!2xH4x16s", raw)
        return socket.inet_ntop(socket.AF_INET6, addr6), port
    raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, addr = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(addr), port


def connect_and_accept(
    client: socket.socket, dest: tuple[str, int], listeners: dict[str, socket.socket]
) -> tuple[str, socket.socket]:
    """Connect; return which listener accepted and the accepted socket."""
    client.connect(dest)
    for name, lst in listeners.items():
        lst.setblocking(False)
        try:
            conn, _ = lst.accept()
            return name, conn
        except BlockingIOError:
            continue
    raise AssertionError(f"connection to {dest} reached none of {sorted(listeners)}")


def test_outbound_goes_to_15001_with_original_destination(pod: Pod) -> None:
    ztunnel = pod.listen(pod.pod, "0.0.0.0", 15001)
    app_target = pod.listen(pod.peer, PEER_IP, 8080)
    with ztunnel, app_target, pod.sock(pod.pod) as app:
        name, conn = connect_and_accept(
            app, (PEER_IP, 8080), {"ztunnel": ztunnel, "peer": app_target}
        )
        with conn:
            assert name == "ztunnel"
            assert original_dst(conn) == (PEER_IP, 8080)


def test_ztunnel_marked_outbound_is_not_captured(pod: Pod) -> None:
    ztunnel = pod.listen(pod.pod, "0.0.0.0", 15001)
    target = pod.listen(pod.peer, PEER_IP, 8080)
    with ztunnel, target, pod.sock(pod.pod, mark=ZTUNNEL_MARK) as zt_client:
        name, conn = connect_and_accept(
            zt_client, (PEER_IP, 8080), {"ztunnel": ztunnel, "peer": target}
        )
        conn.close()
        assert name == "peer"


def test_inbound_goes_to_15006_and_hbone_is_untouched(pod: Pod) -> None:
    inbound = pod.listen(pod.pod, "0.0.0.0", 15006)
    hbone = pod.listen(pod.pod, "0.0.0.0", 15008)
    app = pod.listen(pod.pod, "0.0.0.0", 9090)
    listeners = {"inbound": inbound, "hbone": hbone, "app": app}
    with inbound, hbone, app:
        with pod.sock(pod.peer) as c:
            name, conn = connect_and_accept(c, (POD_IP, 9090), listeners)
            with conn:
                assert name == "inbound"
                assert original_dst(conn) == (POD_IP, 9090)
        with pod.sock(pod.peer) as c:
            name, conn = connect_and_accept(c, (POD_IP, 15008), listeners)
            conn.close()
            assert name == "hbone"


def test_probe_source_and_loopback_are_not_captured(pod: Pod) -> None:
    inbound = pod.listen(pod.pod, "0.0.0.0", 15006)
    outbound = pod.listen(pod.pod, "0.0.0.0", 15001)
    app = pod.listen(pod.pod, "0.0.0.0", 9090)
    listeners = {"inbound": inbound, "outbound": outbound, "app": app}
    with inbound, outbound, app:
        with pod.sock(pod.peer) as probe:
            probe.bind(("169.254.7.127", 0))
            name, conn = connect_and_accept(probe, (POD_IP, 9090), listeners)
            conn.close()
            assert name == "app"
        with pod.sock(pod.pod) as local:
            name, conn = connect_and_accept(local, ("127.0.0.1", 9090), listeners)
            conn.close()
            assert name == "app"


def test_ipv6_outbound_and_inbound_are_captured(pod: Pod) -> None:
    outbound = pod.listen(pod.pod, "::", 15001)
    inbound = pod.listen(pod.pod, "::", 15006)
    peer_app = pod.listen(pod.peer, "::", 8080)
    pod_app = pod.listen(pod.pod, "::", 9090)
    with outbound, inbound, peer_app, pod_app:
        listeners = {"outbound": outbound, "inbound": inbound, "pod_app": pod_app}
        with pod.sock(pod.pod, v6=True) as app:
            name, conn = connect_and_accept(app, (PEER_IP6, 8080), {**listeners, "peer": peer_app})
            with conn:
                assert name == "outbound"
                assert original_dst(conn) == (PEER_IP6, 8080)
        with pod.sock(pod.peer, v6=True) as c:
            name, conn = connect_and_accept(c, (POD_IP6, 9090), listeners)
            with conn:
                assert name == "inbound"
                assert original_dst(conn) == (POD_IP6, 9090)
        with pod.sock(pod.pod, v6=True) as local:
            name, conn = connect_and_accept(local, ("::1", 9090), listeners)
            conn.close()
            assert name == "pod_app"
