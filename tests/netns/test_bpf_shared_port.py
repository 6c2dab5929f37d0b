"""Two captured connections sharing a client port (issue 19), through the eBPF backend.

Linux reuses a client's source port for connections to different destinations (only the
4-tuple must be unique). Redirected to ztunnel's ``127.0.0.1:15001`` (``::1``), two such
connections would become the same 4-tuple: the second SYN meets the first one's socket,
whose challenge ACK makes the client reset it, and the ``nat`` record of the first is
overwritten. The eBPF NAT must give the second one a free source port instead.

The test plays an application holding two long-lived connections from one source port to
two destinations at once (``SO_REUSEADDR`` on both sockets binds the port twice), and a
ztunnel stand-in on 15001 that answers each connection with its ``SO_ORIGINAL_DST`` and then
echoes every line. Both must keep working while the other is open, each must be told its own
destination, and their rewritten client ports must differ. A third connection to a
destination of its own whose port the NAT took for the second one must also get a free port
(the remapped tuple is taken as well). IPv4 and IPv6.

The same from a remote client to two ports of the pod, on the inbound path Linux < 6.5
takes (``inbound_nat``: the destination port rewritten to 15006, which makes one tuple of
both there too).
"""

from __future__ import annotations

import contextlib
import functools
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cni_plugin.bpf.backend import EbpfBackend
from cni_plugin.netns import run_in_netns
from cni_plugin.redirection.settings import RedirectSettings
from tests.behaviour.listeners import Addr, original_destination
from tests.netns.bpf_support import CACHE_DIR, skip_if_unavailable

pytestmark = pytest.mark.netns

FAMILIES = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}
POD = {"ipv4": "198.51.100.2", "ipv6": "2001:db8:7::2"}
PEER = {"ipv4": "198.51.100.1", "ipv6": "2001:db8:7::1"}
PREFIX = {"ipv4": 24, "ipv6": 64}
WILDCARD = {"ipv4": "0.0.0.0", "ipv6": "::"}
TIMEOUT_S = 5.0
ROUNDS = 20


def _ip(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True)


@dataclass
class EchoZtunnel:
    """A ztunnel stand-in on 15001: each connection first gets its original destination
    (as ztunnel reads it), then every line back. ``clients`` lists each accepted peer."""

    listeners: list[socket.socket]
    clients: list[Addr] = field(default_factory=list)
    _conns: list[socket.socket] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        for lst in self.listeners:
            t = threading.Thread(target=self._accept, args=(lst,), daemon=True)
            t.start()
            self._threads.append(t)

    def _accept(self, lst: socket.socket) -> None:
        while True:
            try:
                conn, peer = lst.accept()
            except OSError:
                return  # shut down
            with self._lock:
                self.clients.append((str(peer[0]), int(peer[1])))
                self._conns.append(conn)
            t = threading.Thread(target=self._echo, args=(conn,), daemon=True)
            with self._lock:
                self._threads.append(t)
            t.start()

    def _echo(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            host, port = original_destination(conn)
            conn.sendall(f"{host} {port}\n".encode())
            while data := conn.recv(4096):
                conn.sendall(data)

    def close(self) -> None:
        # Closing an fd wakes no blocked accept or recv: shut down first, then join.
        with self._lock:
            socks = [*self.listeners, *self._conns]
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(timeout=TIMEOUT_S)
        for s in socks:
            s.close()
        assert not any(t.is_alive() for t in threads), "stand-in threads still running"


@dataclass
class Pod:
    path: str
    peer_path: str
    ztunnel: EchoZtunnel
    pin_root: Path
    applied: list[EbpfBackend] = field(default_factory=list)

    def apply(self, inbound_nat: bool = False) -> None:
        backend = EbpfBackend(pin_root=str(self.pin_root), cache_dir=CACHE_DIR,
                              inbound_nat=inbound_nat)  # fmt: skip
        backend.apply(self.path, RedirectSettings())
        self.applied.append(backend)


def _listener(fam: str, port: int) -> socket.socket:
    s = socket.socket(FAMILIES[fam], socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as ztunnel's
        if fam == "ipv6":
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((WILDCARD[fam], port))
        s.listen(16)
    except BaseException:
        s.close()
        raise
    return s


@pytest.fixture
def pod(make_netns: Callable[[str], str], tmp_path: Path) -> Iterator[Pod]:
    skip_if_unavailable()
    ns, peer = make_netns("sharedport"), make_netns("sharedpeer")
    for n in (ns, peer):
        subprocess.run(["ip", "netns", "exec", n, "sysctl", "-qw",
                        "net.ipv6.conf.default.accept_dad=0"], check=True)  # fmt: skip
    subprocess.run(["ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name",
                    "eth0", "netns", peer], check=True)  # fmt: skip
    for n, who in ((ns, POD), (peer, PEER)):
        for fam in FAMILIES:
            extra = ["nodad"] if fam == "ipv6" else []
            _ip(n, "addr", "add", f"{who[fam]}/{PREFIX[fam]}", "dev", "eth0", *extra)
        _ip(n, "link", "set", "eth0", "up")
    path = f"/run/netns/{ns}"
    pin_root = Path("/sys/fs/bpf") / f"icnit-shared-{ns}"
    listeners: list[socket.socket] = []
    try:
        for fam in FAMILIES:
            for port in (15001, 15006):
                listeners.append(run_in_netns(path, functools.partial(_listener, fam, port)))
        zt = EchoZtunnel(listeners)
        zt.start()
        try:
            p = Pod(path, f"/run/netns/{peer}", zt, pin_root)
            yield p
            for backend in p.applied:
                backend.remove(path, RedirectSettings())
        finally:
            zt.close()
    finally:
        for s in listeners:
            s.close()
        subprocess.run(["rm", "-rf", str(pin_root)], check=False)
    assert not pin_root.exists()


def _client(path: str, fam: str, port: int, addr: dict[str, str] = POD) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket(FAMILIES[fam], socket.SOCK_STREAM)
        try:
            # Both sockets set it: then Linux binds one port twice (no listener on it).
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.settimeout(TIMEOUT_S)
            s.bind((addr[fam], port))
        except BaseException:
            s.close()
            raise
        return s

    return run_in_netns(path, make)


def _line(s: socket.socket) -> str:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(256)
        if not chunk:
            raise ConnectionError(f"closed after {buf!r}")
        buf += chunk
    return buf.decode().strip()


def _connect(s: socket.socket, dst: Addr) -> str:
    s.connect(dst)
    return _line(s)


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_two_long_lived_connections_from_one_port_to_two_destinations(pod: Pod, fam: str) -> None:
    pod.apply()
    first = _client(pod.path, fam, 0)
    with contextlib.ExitStack() as stack:
        stack.enter_context(first)
        port = first.getsockname()[1]
        second = stack.enter_context(_client(pod.path, fam, port))
        peer = PEER[fam]
        assert _connect(first, (peer, 80)) == f"{peer} 80"
        assert _connect(second, (peer, 81)) == f"{peer} 81", "the second one's own destination"
        assert second.getsockname()[1] == port, "the application's two sockets share a port"
        for i in range(ROUNDS):
            for name, s in (("first", first), ("second", second)):
                s.sendall(f"{name} {i}\n".encode())
                assert _line(s) == f"{name} {i}", f"{name} connection, round {i}"
        seen = list(pod.ztunnel.clients)
        assert len(seen) == 2 and len(set(seen)) == 2, f"two distinct tuples at 15001: {seen}"
        assert (POD[fam], port) in seen, "the first keeps its own port"
        # A third application socket on the port the second one was given: its tuple at
        # 15001 is taken too, so it must get yet another.
        other = next(p for _, p in seen if p != port)
        third = stack.enter_context(_client(pod.path, fam, other))
        assert _connect(third, (peer, 82)) == f"{peer} 82"
        for name, s in (("first", first), ("second", second), ("third", third)):
            s.sendall(f"{name} again\n".encode())
            assert _line(s) == f"{name} again", f"{name} connection after the third opened"
        assert len(set(pod.ztunnel.clients)) == 3, pod.ztunnel.clients


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_inbound_nat_two_connections_from_one_remote_port_to_two_pod_ports(
    pod: Pod, fam: str
) -> None:
    pod.apply(inbound_nat=True)
    target = POD[fam]
    first = _client(pod.peer_path, fam, 0, PEER)
    with contextlib.ExitStack() as stack:
        stack.enter_context(first)
        port = first.getsockname()[1]
        second = stack.enter_context(_client(pod.peer_path, fam, port, PEER))
        assert _connect(first, (target, 8080)) == f"{target} 8080"
        assert _connect(second, (target, 8081)) == f"{target} 8081"
        for i in range(ROUNDS):
            for name, s in (("first", first), ("second", second)):
                s.sendall(f"{name} {i}\n".encode())
                assert _line(s) == f"{name} {i}", f"{name} connection, round {i}"
        seen = list(pod.ztunnel.clients)
        assert len(seen) == 2 and len(set(seen)) == 2, f"two distinct tuples at 15006: {seen}"
        assert (PEER[fam], port) in seen, "the first keeps its own port"
