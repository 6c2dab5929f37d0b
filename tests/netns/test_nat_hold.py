"""The two kernel facts behind :mod:`node_agent.nat_hold`, on the real kernel, with the real
iptables and nftables backends (issue 19): a pod's open connection is reset when its
redirection goes in, and a connection it redirected is reset when the redirection comes out;
under the hold neither happens, and new connections are redirected as before.

Pod A (redirection, a ztunnel-like echo on 15001 inside it) talks to pod B (an echo app on
9000) over a veth; each answer is tagged with who sent it."""

from __future__ import annotations

import contextlib
import logging
import socket
import subprocess
import threading
from collections.abc import Iterator

import pytest

from cni_plugin.netns import run_in_netns
from cni_plugin.redirection.registry import make_backend
from cni_plugin.redirection.settings import RedirectSettings
from node_agent.departure import Pending
from node_agent.nat_hold import TABLE, NatHold
from testbed.ztunnel_standin.topology import TwoPods, client_socket

pytestmark = pytest.mark.netns
SETTINGS = RedirectSettings(dns_capture=False, ipv6=False)


class Echo:
    """A listener inside a namespace answering ``<tag>:<what it got>``."""

    def __init__(self, netns_path: str, port: int, tag: bytes) -> None:
        def listen() -> socket.socket:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0", port))
            s.listen(16)
            return s

        self.tag = tag
        self.sock = run_in_netns(netns_path, listen)
        self._conns: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._serve, daemon=True)]
        self._threads[0].start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self._conns.append(conn)
            t = threading.Thread(target=self._echo, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(100):
                    conn.sendall(self.tag + b":" + data)
            except OSError:
                return

    def close(self) -> None:
        """Stop serving and end every connection's thread (a closed fd alone wakes no
        blocked accept or recv): the tests after this one count the process's threads."""
        for s in (self.sock, *self._conns):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(5)
        self.sock.close()


@pytest.fixture
def pods() -> Iterator[TwoPods]:
    p = TwoPods(prefix="icnih-", subnet=83)
    proxy, app = Echo(p.a.path, 15001, b"proxy"), Echo(p.b.path, 9000, b"app")
    try:
        yield p
    finally:
        proxy.close()
        app.close()
        p.close()


def _connect(pods: TwoPods) -> socket.socket:
    s = client_socket(pods.a.path)
    s.settimeout(3)
    s.connect((pods.b.ip, 9000))
    return s


def _ask(s: socket.socket, what: bytes) -> bytes:
    try:
        s.sendall(what)
        return s.recv(100)
    except OSError as e:
        return f"{type(e).__name__}".encode()


def _tables(pods: TwoPods) -> str:
    out = subprocess.run(["ip", "netns", "exec", pods.a.name, "nft", "list", "tables"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return out


@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_open_connection_is_reset_by_enrolment_unless_primed_under_the_hold(
    pods: TwoPods, backend: str
) -> None:
    rules, hold = make_backend(backend), NatHold()
    assert hold.open_connections(pods.a.path) == 0  # nothing to prime: no waiting
    bare, primed = _connect(pods), _connect(pods)
    assert hold.open_connections(pods.a.path) == 2
    assert _ask(bare, b"1") == b"app:1" and _ask(primed, b"1") == b"app:1"
    hold.hold(pods.a.path)
    assert _ask(primed, b"2") == b"app:2"  # tracked now, with no NAT: the rules leave it be
    rules.apply(pods.a.path, SETTINGS)
    hold.release(pods.a.path)
    try:
        assert _ask(primed, b"3") == b"app:3"
        # Without a packet under the hold it is taken mid-stream to 15001, and reset there.
        assert _ask(bare, b"3") == b"ConnectionResetError"
        assert _ask(_connect(pods), b"new") == b"proxy:new"  # new ones are redirected
        assert TABLE not in _tables(pods)
    finally:
        rules.remove(pods.a.path, SETTINGS)


@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_redirected_connection_loses_its_nat_on_removal_unless_held(
    pods: TwoPods, backend: str
) -> None:
    rules, hold = make_backend(backend), NatHold()
    rules.apply(pods.a.path, SETTINGS)
    first = _connect(pods)
    assert _ask(first, b"1") == b"proxy:1"
    hold.hold(pods.a.path)
    rules.remove(pods.a.path, SETTINGS)
    assert _ask(first, b"2") == b"proxy:2"  # still its proxy's, as it began
    assert _ask(_connect(pods), b"new") == b"app:new"  # new ones go direct
    hold.release(pods.a.path)
    assert TABLE not in _tables(pods)
    # With no NAT user left, the kernel drops the connection's NAT: reset.
    assert _ask(first, b"3") == b"ConnectionResetError"


def test_a_pending_release_keeps_its_own_handle_and_a_missing_table_is_fine(
    pods: TwoPods, caplog: pytest.LogCaptureFixture
) -> None:
    hold, pending = NatHold(), Pending()
    hold.hold(pods.a.path)
    hold.hold(pods.a.path)  # idempotent
    assert TABLE in _tables(pods)
    released = threading.Event()

    def release(path: str) -> None:
        hold.release(path)
        released.set()

    pending.after("uid-a", pods.a.path, 0.1, release)
    assert released.wait(5) and TABLE not in _tables(pods)
    ran: list[str] = []
    pending.after("uid-a", pods.a.path, 0.1, ran.append)
    pending.cancel("uid-a")  # enrolled again meanwhile
    threading.Event().wait(0.4)
    assert ran == []
    with caplog.at_level(logging.WARNING, logger="node_agent.nat_hold"):
        hold.release(pods.a.path)  # nothing to release: no error, nothing logged
    assert caplog.records == []
