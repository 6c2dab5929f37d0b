"""Sockets the stand-in makes inside a pod's network namespace, and the original destination.

A socket belongs to the network namespace of the thread that created it, for its whole life,
whichever thread uses it later. So every socket the stand-in needs inside a pod (listeners
and outgoing connections) is created by :meth:`Netns.run` on a short-lived thread that enters
the pod namespace through the fd ztunnel received over ZDS, and is then served from the
ordinary event loop thread. Outgoing sockets carry ``SO_MARK 1337`` (0x539) so the pod's
redirection rules let them pass, as real ztunnel's do.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

from cni_plugin import constants as c
from cni_plugin.netns import Netns

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h (level SOL_IPV6)


def listeners_in(netns: Netns, ports: list[tuple[int, int]]) -> list[socket.socket]:
    """Listening sockets (``(port, SOCK_STREAM|SOCK_DGRAM)`` each) bound on ``[::]`` dual-stack
    inside ``netns`` with ``SO_REUSEPORT``, as ztunnel binds them. All or nothing."""

    def make() -> list[socket.socket]:
        made: list[socket.socket] = []
        try:
            for port, kind in ports:
                s = socket.socket(socket.AF_INET6, kind | socket.SOCK_CLOEXEC)
                made.append(s)
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                s.bind(("::", port))
                if kind == socket.SOCK_STREAM:
                    # Accepted sockets inherit it. asyncio sets TCP_NODELAY only on sockets
                    # created with proto=IPPROTO_TCP; without it Nagle meets delayed ACKs
                    # and every proxied request waits ~40 ms.
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    s.listen(512)
                s.setblocking(False)
        except BaseException:
            for s in made:
                s.close()
            raise
        return made

    return netns.run(make)


def marked_socket_in(netns: Netns, family: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A non-blocking socket inside ``netns`` marked ``SO_MARK 1337`` (not yet connected)."""

    def make() -> socket.socket:
        s = socket.socket(family, kind | socket.SOCK_CLOEXEC)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, c.ZTUNNEL_MARK)
            if kind == socket.SOCK_STREAM:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setblocking(False)
        except BaseException:
            s.close()
            raise
        return s

    return netns.run(make)


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """Where a captured connection was going: ``SO_ORIGINAL_DST`` (IPv4, then IPv6), else the
    accepted socket's local address (transparent delivery without NAT), as ztunnel does."""
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port, packed = struct.unpack_from("!2xH4s", raw)
        return socket.inet_ntop(socket.AF_INET, packed), port
    except OSError:
        pass
    try:
        raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)
        port, packed = struct.unpack_from("!2xH4x16s", raw)
        return socket.inet_ntop(socket.AF_INET6, packed), port
    except OSError:
        pass
    host, port = sock.getsockname()[:2]
    return unmap(host), port


def unmap(host: str) -> str:
    """``::ffff:10.0.0.1`` -> ``10.0.0.1`` (dual-stack sockets report v4 peers mapped)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def family_of(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def fmt_addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
