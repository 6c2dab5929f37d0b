"""ZdsServer sending real pod network namespaces: the fd ztunnel receives is the pod's netns."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cni_plugin.errors import NetnsError, ZtunnelRejectedError, ZtunnelUnavailableError
from cni_plugin.netns import Netns, netns_id
from node_agent import zds_wire as w
from node_agent.adapters import CacheSnapshot
from node_agent.pod_cache import CachedPod, PodCache, PodState, ZdsState
from node_agent.zds_server import WorkloadInfo, ZdsServer
from tests.unit.test_zds_server import ListSource, PathEntry, RawPeer, fd_count, wait_for

pytestmark = pytest.mark.netns

INFO = WorkloadInfo("app-1", "demo", "app-sa")


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "zt" / "ztunnel.sock")


@pytest.fixture
def source() -> ListSource:
    return ListSource()


@pytest.fixture
def server(sock_path: str, source: ListSource) -> Iterator[ZdsServer]:
    s = ZdsServer(sock_path, source, ack_timeout=0.5, hello_timeout=0.5, accept_rate=1000)
    s.start()
    yield s
    s.stop()


def _add_in_background(
    server: ZdsServer, *args: object, **kw: object
) -> tuple[threading.Thread, dict[str, BaseException | None]]:
    out: dict[str, BaseException | None] = {"error": None}

    def run() -> None:
        try:
            server.add(*args, **kw)  # type: ignore[arg-type]
        except BaseException as e:
            out["error"] = e

    t = threading.Thread(target=run)
    t.start()
    return t, out


def test_add_carries_the_pods_netns_fd(
    server: ZdsServer, sock_path: str, make_netns: Callable[[str], str]
) -> None:
    # A pod found through /proc, as the agent finds running pods: /proc/<pid>/ns/net.
    name = make_netns("pod")
    proc = subprocess.Popen(["ip", "netns", "exec", name, "sleep", "30"])
    try:
        _add_carries_fd(server, sock_path, f"/proc/{proc.pid}/ns/net")
    finally:
        proc.kill()
        proc.wait()


def _add_carries_fd(server: ZdsServer, sock_path: str, path: str) -> None:
    assert wait_for(lambda: os.readlink(path) != os.readlink("/proc/self/ns/net"))
    peer = RawPeer(sock_path)
    peer.hello_and_empty_snapshot()
    assert wait_for(lambda: server.connected)
    before = fd_count()
    t, out = _add_in_background(server, "uid-1", path, INFO)
    pkt = peer.recv()
    assert pkt.data == w.encode_add("uid-1", "app-1", "demo", "app-sa")
    assert len(pkt.fds) == 1
    assert os.readlink(f"/proc/self/fd/{pkt.fds[0]}") == f"net:[{netns_id(path).inode}]"
    # One request at a time: nothing more until this one is acked.
    assert peer.nothing_for(0.1)
    peer.send(w.encode_ack())
    t.join()
    assert out["error"] is None
    pkt.close_fds()
    assert fd_count() == before  # the agent closed its netns handle
    peer.close()


def test_ack_error_is_a_rejected_add(
    server: ZdsServer, sock_path: str, make_netns: Callable[[str], str]
) -> None:
    path = f"/run/netns/{make_netns('pod')}"
    peer = RawPeer(sock_path)
    peer.hello_and_empty_snapshot()
    t, out = _add_in_background(server, "uid-1", path, INFO)
    peer.recv().close_fds()
    peer.send(w.encode_ack("failure to start proxy: address in use"))
    t.join()
    assert isinstance(out["error"], ZtunnelRejectedError)
    assert "address in use" in str(out["error"])
    assert server.connected  # an ack error does not drop the connection
    peer.close()


def test_unacked_add_unavailable_connection_dropped_no_leak(
    server: ZdsServer, sock_path: str, make_netns: Callable[[str], str]
) -> None:
    path = f"/run/netns/{make_netns('pod')}"
    before = fd_count()
    peer = RawPeer(sock_path)
    peer.hello_and_empty_snapshot()
    t, out = _add_in_background(server, "uid-1", path, INFO)
    pkt = peer.recv()
    t.join()
    assert isinstance(out["error"], ZtunnelUnavailableError)
    assert peer.eof()
    pkt.close_fds()
    peer.close()
    assert wait_for(lambda: fd_count() == before)


def test_caller_timeout_shorter_than_ack_leaks_nothing(
    server: ZdsServer, sock_path: str, make_netns: Callable[[str], str]
) -> None:
    path = f"/run/netns/{make_netns('pod')}"
    peer = RawPeer(sock_path)
    peer.hello_and_empty_snapshot()
    before = fd_count()
    with pytest.raises(ZtunnelUnavailableError, match=r"within 0\.1s"):
        server.add("uid-1", path, INFO, timeout=0.1)
    pkt = peer.recv()
    peer.send(w.encode_ack())  # late ack: the connection survives, the fd is released
    pkt.close_fds()
    assert wait_for(lambda: fd_count() == before)
    assert server.connected
    peer.close()


def test_missing_netns_is_refused_before_sending(server: ZdsServer, sock_path: str) -> None:
    peer = RawPeer(sock_path)
    peer.hello_and_empty_snapshot()
    assert wait_for(lambda: server.connected)
    with pytest.raises(NetnsError, match="does not exist"):
        server.add("uid-1", "/run/netns/icnit-never-made", INFO)
    assert not os.path.exists("/run/netns/icnit-never-made")
    assert peer.nothing_for(0.1)
    peer.close()


def test_snapshot_add_keep_then_snapshot_sent_each_acked(
    server: ZdsServer, source: ListSource, sock_path: str, make_netns: Callable[[str], str]
) -> None:
    path = f"/run/netns/{make_netns('pod')}"
    source.entries = [
        PathEntry("uid-a", INFO, path),
        PathEntry("uid-b", WorkloadInfo("b", "demo", "sa"), None),
        PathEntry("uid-c", WorkloadInfo("c", "demo", "sa"), "/run/netns/icnit-gone"),
    ]
    peer = RawPeer(sock_path)
    peer.send(w.encode_hello())
    first = peer.recv()
    assert first.data == w.encode_add("uid-a", "app-1", "demo", "app-sa")
    assert [os.fstat(fd).st_ino for fd in first.fds] == [netns_id(path).inode]
    first.close_fds()
    assert peer.nothing_for(0.1)  # waits for the ack before the next message
    peer.send(w.encode_ack())
    keep_b = peer.recv()
    assert keep_b.data == bytes.fromhex("2a070a05") + b"uid-b" and keep_b.fds == []
    peer.send(w.encode_ack())
    keep_c = peer.recv()  # netns path vanished: Keep rather than nothing
    assert keep_c.data == w.encode_keep("uid-c") and keep_c.fds == []
    peer.send(w.encode_ack())
    assert peer.recv().data == bytes.fromhex("1a00")
    peer.send(w.encode_ack())
    assert wait_for(lambda: server.connected)
    peer.close()


def test_add_goes_to_newest_connection_only(
    server: ZdsServer, sock_path: str, make_netns: Callable[[str], str]
) -> None:
    path = f"/run/netns/{make_netns('pod')}"
    old, new = RawPeer(sock_path), None
    old.hello_and_empty_snapshot()
    assert wait_for(lambda: server.connection_count == 1)
    new = RawPeer(sock_path)
    new.hello_and_empty_snapshot()
    assert wait_for(lambda: server.connection_count == 2)
    t, out = _add_in_background(server, "uid-1", path, INFO)
    pkt = new.recv()
    assert len(pkt.fds) == 1
    pkt.close_fds()
    new.send(w.encode_ack())
    t.join()
    assert out["error"] is None
    assert old.nothing_for(0.1)
    old.close()
    new.close()


def test_socket_group_lets_ztunnels_group_connect_only(tmp_path: Path) -> None:
    import grp
    import stat

    gid = grp.getgrnam("nogroup").gr_gid
    path = str(tmp_path / "zt" / "ztunnel.sock")
    s = ZdsServer(path, ListSource(), socket_group="nogroup")
    s.start()
    try:
        st, dst = os.stat(path), os.stat(os.path.dirname(path))
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o660, 0, gid)
        # Group members may traverse the directory but not list or replace its entries.
        assert (stat.S_IMODE(dst.st_mode), dst.st_gid) == (0o710, gid)
    finally:
        s.stop()


def test_snapshot_adds_carry_each_pods_own_netns_while_pods_churn(
    sock_path: str, make_netns: Callable[[str], str]
) -> None:
    """Issue 14.1: the snapshot is sent one ack at a time; meanwhile removals close cache fds
    and enrolments reuse their numbers. Every Add must still carry its own pod's namespace."""
    cache = PodCache()
    expected: dict[str, int] = {}

    def enrol(uid: str) -> None:
        ns = Netns.open(f"/run/netns/{make_netns(uid)}")
        cache.put(
            CachedPod(uid, "demo", uid, "sa", (), ns, state=PodState.ENABLED, zds=ZdsState.ACKED)
        )
        expected[uid] = ns.inode

    for i in range(6):
        enrol(f"old-{i}")
    before = fd_count()
    server = ZdsServer(
        sock_path, CacheSnapshot(cache), ack_timeout=5, hello_timeout=5, accept_rate=1000
    )
    server.start()
    adds: list[tuple[str, list[int]]] = []
    try:
        peer = RawPeer(sock_path)
        peer.send(w.encode_hello())
        added = 0
        while True:
            pkt = peer.recv(timeout=5)
            req = w.decode_request(pkt.data)
            kind = req.WhichOneof("payload")
            if kind == "add":
                adds.append((req.add.uid, [os.fstat(fd).st_ino for fd in pkt.fds]))
            pkt.close_fds()
            if kind == "snapshot_sent":
                peer.send(w.encode_ack())
                break
            # A slow ack: before answering, the newest pod not sent yet is removed (its fd
            # closed) and a new pod is enrolled (its fd takes the freed number).
            sent = {uid for uid, _ in adds}
            victims = [e for e in cache.entries() if e.uid.startswith("old-") and e.uid not in sent]
            if victims:
                gone = cache.pop(victims[-1].uid)
                assert gone is not None and gone.netns is not None
                gone.netns.close()
                enrol(f"new-{added}")
                added += 1
            peer.send(w.encode_ack())
        assert wait_for(lambda: server.connected)
        peer.close()
    finally:
        server.stop()
    assert added >= 2 and len(adds) >= 3, adds
    assert [(uid, inodes) for uid, inodes in adds if inodes != [expected[uid]]] == []
    assert fd_count() == before  # the snapshot closed every handle it held
    cache.close()
