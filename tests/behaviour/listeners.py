"""Real listening sockets inside test namespaces that say who they are and what they saw.

Every server answers each TCP connection or UDP datagram with its name and a newline, and
records an :class:`Accepted` (client address, local address, original destination). The
original destination is learned exactly as real ztunnel learns it: ``SO_ORIGINAL_DST`` for
IPv4, then ``IP6T_SO_ORIGINAL_DST``, and when both fail the accepted socket's local address
(so a backend that delivers transparently, without NAT, is judged the same way).

Sockets are created on a thread inside their namespace (so they belong to it) and then
served by one selector thread; :meth:`Servers.close` stops it and closes every socket.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from dataclasses import dataclass

from cni_plugin.netns import run_in_netns

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80  # linux/netfilter_ipv6/ip6_tables.h
SOL_IPV6 = 41
ZTUNNEL_MARK = 1337

Addr = tuple[str, int]


@dataclass(frozen=True)
class Accepted:
    listener: str  # e.g. "ztunnel:15001"
    proto: str  # "tcp" | "udp"
    client: Addr
    local: Addr
    original_dst: Addr


def original_destination(conn: socket.socket) -> Addr:
    """What ztunnel would consider the destination of an accepted connection."""
    try:
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        if int.from_bytes(raw[0:2], "little") == socket.AF_INET:
            return socket.inet_ntop(socket.AF_INET, raw[4:8]), int.from_bytes(raw[2:4], "big")
    except OSError:
        pass
    try:
        raw = conn.getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST, 28)
        if int.from_bytes(raw[0:2], "little") == socket.AF_INET6:
            return socket.inet_ntop(socket.AF_INET6, raw[8:24]), int.from_bytes(raw[2:4], "big")
    except OSError:
        pass
    local = conn.getsockname()
    return local[0], local[1]


def _addr(sockaddr: tuple[object, ...]) -> Addr:
    return str(sockaddr[0]), int(str(sockaddr[1]))


class Servers:
    """A set of named listeners in various namespaces, served by one thread."""

    def __init__(self) -> None:
        self._sel = selectors.DefaultSelector()
        self._names: dict[int, tuple[str, str]] = {}
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self.accepted: list[Accepted] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="behaviour-servers", daemon=True)
        self._thread.start()

    def listen(
        self, netns_path: str, name: str, proto: str, family: int, host: str, port: int
    ) -> None:
        def make() -> socket.socket:
            kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
            s = socket.socket(family, kind)
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                # ztunnel's listeners use SO_REUSEPORT and mark their own sockets.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind((host, port))
                if proto == "tcp":
                    s.listen(64)
                s.setblocking(False)
            except BaseException:
                s.close()
                raise
            return s

        sock = run_in_netns(netns_path, make)
        with self._lock:
            self._socks.append(sock)
            self._names[sock.fileno()] = (name, proto)
            self._sel.register(sock, selectors.EVENT_READ)

    def _serve(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                ready = self._sel.select(timeout=0.05) if self._socks else []
            if not ready:
                time.sleep(0.01)
                continue
            for key, _ in ready:
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                with self._lock:
                    name, proto = self._names[sock.fileno()]
                try:
                    if proto == "tcp":
                        self._on_tcp(sock, name)
                    else:
                        self._on_udp(sock, name)
                except OSError:
                    continue

    def _on_tcp(self, sock: socket.socket, name: str) -> None:
        conn, peer = sock.accept()
        with conn:
            rec = Accepted(name, "tcp", _addr(peer), _addr(conn.getsockname()),
                           original_destination(conn))  # fmt: skip
            with self._lock:
                self.accepted.append(rec)
            conn.setblocking(True)
            conn.settimeout(2)
            conn.sendall(f"{name}\n".encode())

    def _on_udp(self, sock: socket.socket, name: str) -> None:
        _data, peer = sock.recvfrom(2048)
        local = _addr(sock.getsockname())
        with self._lock:
            self.accepted.append(Accepted(name, "udp", _addr(peer), local, local))
        sock.sendto(f"{name}\n".encode(), peer)

    def find(self, client: Addr) -> list[Accepted]:
        """Records of connections whose client address was ``client``."""
        with self._lock:
            return [a for a in self.accepted if a.client == client]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            for s in self._socks:
                with contextlib.suppress(KeyError, ValueError):
                    self._sel.unregister(s)
                s.close()
            self._socks.clear()
        self._sel.close()
