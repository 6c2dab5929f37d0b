"""ZdsServer against raw ZDS peers on a real SOCK_SEQPACKET socket (no root needed).

Covers the socket file's lifecycle and permissions, the per-connection sequence, and bad
peers: each one is dropped with a log line naming it, the agent keeps serving, no fd leaks.
Tests that send real network namespaces live in tests/netns/test_zds_netns.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cni_plugin.errors import ConfigError, NetnsError, ZtunnelUnavailableError
from cni_plugin.netns import Netns
from node_agent import zds_socket
from node_agent import zds_wire as w
from node_agent.zds_server import SnapshotEntry, WorkloadInfo, ZdsServer
from tests.time_scale import scaled

INFO = WorkloadInfo("app", "default", "sa")


class RawPeer:
    """A ztunnel-side peer speaking raw bytes, so tests see exactly what goes on the wire."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.connect(path)

    def send(self, data: bytes, fd: int | None = None) -> None:
        zds_socket.send_packet(self.sock, data, fd, timeout=2)

    def recv(self, timeout: float = 2) -> zds_socket.Packet:
        return zds_socket.recv_packet(self.sock, timeout=timeout)

    def nothing_for(self, seconds: float) -> bool:
        try:
            pkt = zds_socket.recv_packet(self.sock, timeout=seconds)
        except w.ZdsClosedError as e:
            return isinstance(e.__cause__, TimeoutError)
        pkt.close_fds()
        return False

    def hello_and_empty_snapshot(self) -> None:
        self.send(w.encode_hello())
        assert self.recv().data == bytes.fromhex("1a00")
        self.send(w.encode_ack())

    def eof(self, timeout: float = 2) -> bool:
        try:
            pkt = self.recv(timeout)
        except w.ZdsClosedError as e:
            return "EOF" in str(e) or "reset" in str(e).lower()
        pkt.close_fds()
        return False

    def close(self) -> None:
        self.sock.close()


@dataclass(frozen=True)
class PathEntry:
    """A snapshot entry named by its netns path: :class:`ListSource` opens the path each
    time a snapshot is taken (a path that cannot be opened is a Keep, as for the agent's
    cache a pod whose namespace was not found)."""

    uid: str
    info: WorkloadInfo
    path: str | None


class ListSource:
    """A snapshot source whose snapshots, like the agent's, own fresh namespace handles."""

    def __init__(self, entries: list[PathEntry] | None = None) -> None:
        self.entries = entries or []

    def snapshot(self) -> list[SnapshotEntry]:
        out = []
        for e in self.entries:
            ns = None
            if e.path is not None:
                with contextlib.suppress(NetnsError):
                    ns = Netns.open(e.path, host_netns=None)
            out.append(SnapshotEntry(e.uid, e.info, ns))
        return out


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def wait_for(pred: Callable[[], bool], timeout: float = 3.0) -> bool:
    end = time.monotonic() + scaled(timeout)
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "ztunnel" / "ztunnel.sock")


@pytest.fixture
def server(sock_path: str) -> Iterator[ZdsServer]:
    s = ZdsServer(
        sock_path,
        ListSource(),
        ack_timeout=0.5,
        hello_timeout=0.5,
        keepalive_interval=0.05,
        accept_rate=1000,
    )
    s.start()
    yield s
    s.stop()


def test_socket_file_directory_and_permissions(sock_path: str) -> None:
    before = fd_count()
    s = ZdsServer(sock_path, ListSource())
    s.start()
    st = os.stat(sock_path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(sock_path)).st_mode) == 0o700
    assert not [n for n in os.listdir(os.path.dirname(sock_path)) if ".tmp-" in n]
    s.stop()
    assert not os.path.exists(sock_path)
    assert fd_count() == before


def test_stale_socket_replaced_live_agent_refused(sock_path: str) -> None:
    os.makedirs(os.path.dirname(sock_path), mode=0o700)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(sock_path)
    stale.close()  # the file stays, nobody listens: a crashed agent's leftover
    first = ZdsServer(sock_path, ListSource(), accept_rate=1000)
    first.start()
    try:
        second = ZdsServer(sock_path, ListSource())
        with pytest.raises(ConfigError, match=rf"another live node agent \(pid={os.getpid()}"):
            second.start()
        # The live agent's socket is untouched and still serves.
        peer = RawPeer(sock_path)
        peer.hello_and_empty_snapshot()
        assert wait_for(lambda: first.connected)
        peer.close()
    finally:
        first.stop()


def test_hello_snapshot_sent_then_connected_events(server: ZdsServer, sock_path: str) -> None:
    events: list[bool] = []
    server._on_connected_change = events.append
    peer = RawPeer(sock_path)
    assert not server.connected
    peer.send(bytes.fromhex("0801"))
    pkt = peer.recv()
    assert pkt.data == bytes.fromhex("1a00") and pkt.fds == []
    peer.send(bytes.fromhex("0a00"))
    assert wait_for(lambda: server.connected)
    peer.close()
    assert wait_for(lambda: not server.connected)
    assert events == [True, False]


def test_add_without_ztunnel_is_unavailable(server: ZdsServer) -> None:
    with pytest.raises(ZtunnelUnavailableError, match="no ztunnel is connected"):
        server.add("u1", "/proc/self/ns/net", INFO)


def test_delete_reaches_every_connection(server: ZdsServer, sock_path: str) -> None:
    peers = [RawPeer(sock_path) for _ in range(2)]
    for p in peers:
        p.hello_and_empty_snapshot()
    assert wait_for(lambda: server.connection_count == 2)
    got: list[bytes] = []

    def answer(p: RawPeer) -> None:
        got.append(p.recv().data)
        p.send(w.encode_ack())

    threads = [threading.Thread(target=answer, args=(p,)) for p in peers]
    for t in threads:
        t.start()
    server.delete("gone-uid")
    for t in threads:
        t.join()
    assert got == [bytes.fromhex("120a1208") + b"gone-uid"] * 2
    for p in peers:
        p.close()


def _bad_peer_cases() -> dict[str, Callable[[RawPeer], None]]:
    def garbage(p: RawPeer) -> None:
        p.send(b"\xff\xfe\xfd garbage")

    def oversized(p: RawPeer) -> None:
        p.send(b"\x08\x01" + b"\x00" * 3000)

    def fd_on_hello(p: RawPeer) -> None:
        r, wr = os.pipe()
        p.send(w.encode_hello(), r)
        os.close(r)
        os.close(wr)

    def fd_on_ack(p: RawPeer) -> None:
        p.send(w.encode_hello())
        assert p.recv().data == w.encode_snapshot_sent()
        r, wr = os.pipe()
        p.send(w.encode_ack(), r)
        os.close(r)
        os.close(wr)

    def truncated_hello(p: RawPeer) -> None:
        p.send(b"\x08")  # the version's varint is cut off

    def truncated_ack(p: RawPeer) -> None:
        p.send(w.encode_hello())
        assert p.recv().data == w.encode_snapshot_sent()
        p.send(w.encode_ack("bad")[:-2])  # length says 5, 3 bytes follow

    def never_hello(p: RawPeer) -> None:
        pass

    def never_acks(p: RawPeer) -> None:
        p.send(w.encode_hello())
        assert p.recv().data == w.encode_snapshot_sent()

    def unprompted(p: RawPeer) -> None:
        p.hello_and_empty_snapshot()
        p.send(w.encode_ack())  # nothing was asked: protocol error found by the keepalive

    return {
        "garbage": garbage,
        "oversized": oversized,
        "fd_on_hello": fd_on_hello,
        "fd_on_ack": fd_on_ack,
        "never_hello": never_hello,
        "truncated_hello": truncated_hello,
        "truncated_ack": truncated_ack,
        "never_acks": never_acks,
        "unprompted": unprompted,
    }


@pytest.mark.parametrize("case", sorted(_bad_peer_cases()))
def test_bad_peer_dropped_agent_alive_no_fd_leak(
    case: str, server: ZdsServer, sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="node_agent.zds")
    before = fd_count()
    peer = RawPeer(sock_path)
    _bad_peer_cases()[case](peer)
    assert peer.eof(), f"{case}: the agent must drop this connection"
    peer.close()
    drops = [r for r in caplog.records if r.getMessage() == "ztunnel connection dropped"]
    assert drops, f"{case}: no log line about the dropped peer"
    fields = drops[-1].fields  # type: ignore[attr-defined]
    assert f"pid={os.getpid()}" in fields["peer"] and fields["reason"]
    # The process's fd count: other threads of a long pytest session may hold one for a
    # moment, so the wait is generous; a real leak still fails it.
    assert wait_for(lambda: fd_count() == before, timeout=10.0), f"{case}: fd leaked"
    assert not server.connected
    # The agent is alive: a well-behaved ztunnel is served right after.
    good = RawPeer(sock_path)
    good.hello_and_empty_snapshot()
    assert wait_for(lambda: server.connected)
    good.close()


def test_hundred_connect_disconnect_cycles_leak_nothing(server: ZdsServer, sock_path: str) -> None:
    before = fd_count()
    threads_before = threading.active_count()
    for i in range(100):
        p = RawPeer(sock_path)
        if i % 2:
            p.hello_and_empty_snapshot()
        p.close()
    assert wait_for(lambda: fd_count() == before and not server.connected, timeout=5)
    assert wait_for(lambda: threading.active_count() == threads_before)
    good = RawPeer(sock_path)
    good.hello_and_empty_snapshot()
    assert wait_for(lambda: server.connected)
    good.close()


def test_accept_rate_limit_like_istio(sock_path: str) -> None:
    s = ZdsServer(sock_path, ListSource(), hello_timeout=2)  # default: 5 accepts per second
    s.start()
    try:
        t0 = time.monotonic()
        peers = [RawPeer(sock_path) for _ in range(4)]
        for p in peers:
            p.hello_and_empty_snapshot()
        elapsed = time.monotonic() - t0
        assert elapsed >= 0.55, f"4 connections served in {elapsed:.2f}s: accepts not limited"
        for p in peers:
            p.close()
    finally:
        s.stop()


def test_only_the_configured_ztunnel_uid_may_connect(
    sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 14.9: SO_PEERCRED must be ztunnel's uid; another local peer is logged and
    dropped before its hello, and never counts as connected."""
    me = os.getuid()
    s = ZdsServer(sock_path, ListSource(), peer_uid=me + 1, accept_rate=1000, hello_timeout=2)
    s.start()
    try:
        with caplog.at_level(logging.WARNING, logger="node_agent.zds"):
            peer = RawPeer(sock_path)
            with contextlib.suppress(w.ZdsClosedError):  # may already be dropped
                peer.send(w.encode_hello())
            assert peer.eof()
            peer.close()
        assert s.refused_peers == 1 and not s.connected
        assert any(
            "unexpected peer dropped" in r.getMessage()
            and getattr(r, "fields", {}).get("expected_uid") == me + 1
            for r in caplog.records
        )
    finally:
        s.stop()
    ok = ZdsServer(sock_path, ListSource(), peer_uid=me, accept_rate=1000)
    ok.start()
    try:
        peer = RawPeer(sock_path)
        peer.hello_and_empty_snapshot()
        assert wait_for(lambda: ok.connected) and ok.refused_peers == 0
        peer.close()
    finally:
        ok.stop()
