"""The ztunnel stand-in against the real ZdsServer and real pod namespaces.

The stand-in runs as its own process (``python -m testbed.ztunnel_standin``), as it does in
the testbed; what it opened inside a pod is read with ``ss`` inside that namespace.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cni_plugin.netns import run_in_netns
from node_agent import zds_socket
from node_agent import zds_wire as w
from node_agent.zds_server import SnapshotEntry, WorkloadInfo, ZdsServer
from tests.time_scale import scaled
from tests.unit.test_zds_server import ListSource, wait_for

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parents[2]
ZTUNNEL_PORTS = {("tcp", 15001), ("tcp", 15006), ("tcp", 15008), ("tcp", 15053), ("udp", 15053)}


class StandinProcess:
    """``python -m testbed.ztunnel_standin`` with its files under one directory."""

    def __init__(self, sock: str, workdir: Path, *extra: str) -> None:
        self.sock, self.workdir, self.extra = sock, workdir, extra
        self.access_log = workdir / "access.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        stderr = open(self.workdir / "standin.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "testbed.ztunnel_standin",
                "--socket",
                self.sock,
                "--access-log",
                str(self.access_log),
                "--ca-dir",
                str(self.workdir / "ca"),
                "--log-level",
                "debug",
                *self.extra,
            ],
            cwd=ROOT,
            stderr=stderr,
        )
        stderr.close()

    def stop(self) -> int:
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(scaled(10))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.proc = None
        return rc

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def log(self) -> str:
        return (self.workdir / "standin.log").read_text()


def listeners(netns_name: str) -> set[tuple[str, int]]:
    out = subprocess.run(
        ["ip", "netns", "exec", netns_name, "ss", "-Hlntu"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = set()
    for line in out.splitlines():
        cols = line.split()
        found.add((cols[0], int(cols[4].rsplit(":", 1)[1])))
    return found


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[ZdsServer, ListSource]]:
    source = ListSource()
    server = ZdsServer(
        str(tmp_path / "zt" / "ztunnel.sock"),
        source,
        accept_rate=1000,
        ack_timeout=scaled(5),
        hello_timeout=scaled(5),
    )
    server.start()
    yield server, source
    server.stop()


@pytest.fixture
def standin(agent: tuple[ZdsServer, ListSource], tmp_path: Path) -> Iterator[StandinProcess]:
    s = StandinProcess(agent[0].socket_path, tmp_path)
    s.start()
    yield s
    assert s.stop() == 0, s.log()


def info(name: str) -> WorkloadInfo:
    return WorkloadInfo(name, "demo", f"{name}-sa")


def test_add_opens_ztunnel_listeners_inside_pod_with_reuseport(
    agent: tuple[ZdsServer, ListSource],
    standin: StandinProcess,
    make_netns: Callable[[str], str],
) -> None:
    server, _ = agent
    pod = make_netns("pod")
    assert wait_for(lambda: server.connected, 10), standin.log()
    server.add("uid-1", f"/run/netns/{pod}", info("a"))
    assert listeners(pod) == ZTUNNEL_PORTS
    assert not ZTUNNEL_PORTS & listeners_host()

    # SO_REUSEPORT: another reuseport socket may bind 15001 there, a plain one may not.
    def bind(reuse: bool) -> bool:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, int(reuse))
            s.bind(("::", 15001))
            return True
        except OSError:
            return False
        finally:
            s.close()

    assert run_in_netns(f"/run/netns/{pod}", lambda: bind(True))
    assert not run_in_netns(f"/run/netns/{pod}", lambda: bind(False))

    server.delete("uid-1")
    assert listeners(pod) == set()


def listeners_host() -> set[tuple[str, int]]:
    out = subprocess.run(["ss", "-Hlntu"], capture_output=True, text=True, check=True).stdout
    return {(ln.split()[0], int(ln.split()[4].rsplit(":", 1)[1])) for ln in out.splitlines()}


def test_same_inode_is_noop_new_inode_replaces(
    agent: tuple[ZdsServer, ListSource],
    standin: StandinProcess,
    make_netns: Callable[[str], str],
) -> None:
    server, _ = agent
    first, second = make_netns("pod"), make_netns("pod")
    assert wait_for(lambda: server.connected, 10)
    server.add("uid-1", f"/run/netns/{first}", info("a"))
    ino = _listener_inode(first)
    server.add("uid-1", f"/run/netns/{first}", info("a"))
    assert _listener_inode(first) == ino  # untouched: no new listeners
    assert "add for a known netns: no-op" in standin.log()
    server.add("uid-1", f"/run/netns/{second}", info("a"))  # sandbox re-created
    assert listeners(first) == set()
    assert listeners(second) == ZTUNNEL_PORTS


def _listener_inode(netns_name: str) -> str:
    out = subprocess.run(
        ["ip", "netns", "exec", netns_name, "ss", "-Hltne", "sport", "= :15001"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.split("ino:")[1].split()[0]


def test_restart_readds_every_pod_and_reconnect_drops_stale(
    agent: tuple[ZdsServer, ListSource],
    tmp_path: Path,
    make_netns: Callable[[str], str],
) -> None:
    server, source = agent
    pods = [make_netns("pod") for _ in range(3)]
    standin = StandinProcess(server.socket_path, tmp_path)
    standin.start()
    try:
        assert wait_for(lambda: server.connected, 10)
        for i, p in enumerate(pods):
            server.add(f"uid-{i}", f"/run/netns/{p}", info(f"p{i}"))
            source.entries.append(SnapshotEntry(f"uid-{i}", info(f"p{i}"), f"/run/netns/{p}"))
        # ztunnel restarts: its listeners go with it, and come back from the snapshot alone.
        standin.kill()
        assert wait_for(lambda: not server.connected, 10)
        assert all(listeners(p) == set() for p in pods)
        standin.start()
        assert wait_for(lambda: all(listeners(p) == ZTUNNEL_PORTS for p in pods), 15)

        # The agent restarts without pod 2 (deleted meanwhile) and pod 1's netns unknown:
        # the stand-in reconnects (backoff), keeps pod 1, drops pod 2.
        source.entries = [source.entries[0], SnapshotEntry("uid-1", info("p1"), None)]
        server.stop()
        time.sleep(0.3)  # a few failed reconnects with backoff
        server.start()
        assert wait_for(lambda: listeners(pods[2]) == set(), 15), standin.log()
        assert listeners(pods[0]) == ZTUNNEL_PORTS
        assert listeners(pods[1]) == ZTUNNEL_PORTS
    finally:
        assert standin.stop() == 0
    assert all(listeners(p) == set() for p in pods)  # a clean exit closes everything


class RawAgent:
    """An agent speaking raw ZDS, to feed the stand-in what a correct agent never sends."""

    def __init__(self, path: str) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(path)
        self.listener.listen(4)
        self.listener.settimeout(scaled(10))

    def accept_hello(self) -> socket.socket:
        conn, _ = self.listener.accept()
        assert zds_socket.recv_packet(conn, timeout=scaled(5)).data == bytes.fromhex("0801")
        return conn

    def ask(self, conn: socket.socket, data: bytes, fd: int | None = None) -> str:
        zds_socket.send_packet(conn, data, fd, timeout=scaled(5))
        return w.decode_ack(zds_socket.recv_packet(conn, timeout=scaled(10)).data)

    def close(self) -> None:
        self.listener.close()


@pytest.mark.parametrize(
    "case",
    [
        "second_snapshot_sent",
        "keep_after_snapshot",
        "add_without_workload_info",
        "del_before_snapshot",
        "fd_on_keep",
        "garbage",
    ],
)
def test_standin_enforces_ztunnel_protocol_rules(
    case: str, tmp_path: Path, make_netns: Callable[[str], str]
) -> None:
    path = str(tmp_path / "raw.sock")
    agent = RawAgent(path)
    standin = StandinProcess(path, tmp_path)
    standin.start()
    pod = make_netns("pod")
    fd = os.open(f"/run/netns/{pod}", os.O_RDONLY)
    try:
        conn = agent.accept_hello()
        if case == "second_snapshot_sent":
            assert agent.ask(conn, w.encode_snapshot_sent()) == ""
            err = agent.ask(conn, w.encode_snapshot_sent())
        elif case == "keep_after_snapshot":
            assert agent.ask(conn, w.encode_snapshot_sent()) == ""
            err = agent.ask(conn, w.encode_keep("u"))
        elif case == "add_without_workload_info":
            from node_agent import zds_pb2 as pb

            bare = pb.WorkloadRequest(add=pb.AddWorkload(uid="u")).SerializeToString()
            err = agent.ask(conn, bare, fd)
        elif case == "del_before_snapshot":
            err = agent.ask(conn, w.encode_del("u"))
        elif case == "fd_on_keep":
            err = agent.ask(conn, w.encode_keep("u"), fd)
        else:
            err = agent.ask(conn, b"\xff\xff\xff")
        assert err, f"{case}: must be nacked"
        # ...and the stream is ended: EOF here, then a fresh connection with a new hello.
        with pytest.raises(w.ZdsClosedError, match="EOF"):
            zds_socket.recv_packet(conn, timeout=scaled(5))
        conn.close()
        again = agent.accept_hello()
        again.close()
        assert listeners(pod) == set()
    finally:
        os.close(fd)
        standin.stop()
        agent.close()


def test_proxy_error_is_a_nack_then_retried_while_connected(
    tmp_path: Path, make_netns: Callable[[str], str]
) -> None:
    path = str(tmp_path / "raw.sock")
    agent = RawAgent(path)
    standin = StandinProcess(path, tmp_path)
    standin.start()
    pod = make_netns("pod")
    # A plain (non-reuseport) socket already on 15008 in the pod: the proxy cannot start.
    blocker = run_in_netns(f"/run/netns/{pod}", lambda: _bound(15008))
    fd = os.open(f"/run/netns/{pod}", os.O_RDONLY)
    pipe_r, pipe_w = os.pipe()
    try:
        conn = agent.accept_hello()
        assert agent.ask(conn, w.encode_snapshot_sent()) == ""
        err = agent.ask(conn, w.encode_add("u", "a", "demo", "sa"), fd)
        assert "failure to start proxy" in err
        # An fd that is not a network namespace: also just a failed proxy, stream kept.
        err = agent.ask(conn, w.encode_add("v", "b", "demo", "sa"), pipe_r)
        assert "failure to start proxy" in err
        assert agent.ask(conn, w.encode_del("v")) == ""
        # Like ztunnel, the stand-in retries the pending pod (every 5 s) on its own.
        blocker.close()
        assert wait_for(lambda: listeners(pod) == ZTUNNEL_PORTS, 12), standin.log()
        assert agent.ask(conn, w.encode_add("u", "a", "demo", "sa"), fd) == ""  # same inode
        assert agent.ask(conn, w.encode_del("u")) == ""
        assert listeners(pod) == set()
        conn.close()
    finally:
        blocker.close()
        for f in (fd, pipe_r, pipe_w):
            os.close(f)
        standin.stop()
        agent.close()


def _bound(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
    s.listen(1)
    return s


def test_standin_backs_off_10ms_doubling_until_the_agent_appears(
    tmp_path: Path, make_netns: Callable[[str], str]
) -> None:
    sock = str(tmp_path / "late" / "ztunnel.sock")
    standin = StandinProcess(sock, tmp_path)
    standin.start()
    server = ZdsServer(
        sock, ListSource(), accept_rate=1000, ack_timeout=scaled(5), hello_timeout=scaled(5)
    )

    def waits() -> list[float]:
        return [
            float(json.loads(ln)["retry_in_s"])
            for ln in standin.log().splitlines()
            if '"retry_in_s"' in ln
        ]

    try:
        # No agent yet: the stand-in keeps retrying, each wait twice the one before.
        assert wait_for(lambda: len(waits()) >= 6, 20), standin.log()
        t0 = time.monotonic()
        server.start()
        assert wait_for(lambda: server.connected, 5), standin.log()
        seen = waits()
        assert time.monotonic() - t0 < 2 * seen[-1] + scaled(1.0)  # the next retry found it
        assert seen[:6] == [0.02, 0.04, 0.08, 0.16, 0.32, 0.64]
        assert all(b == min(15.0, 2 * a) for a, b in itertools.pairwise(seen))
        pod = make_netns("pod")
        server.add("uid-1", f"/run/netns/{pod}", info("a"))
        assert listeners(pod) == ZTUNNEL_PORTS
    finally:
        assert standin.stop() == 0
        server.stop()


def test_standin_closes_every_fd_it_took(
    agent: tuple[ZdsServer, ListSource],
    standin: StandinProcess,
    make_netns: Callable[[str], str],
) -> None:
    server, _ = agent
    assert wait_for(lambda: server.connected, 10)
    assert standin.proc is not None
    fds = f"/proc/{standin.proc.pid}/fd"
    before = len(os.listdir(fds))
    pods = [make_netns("pod") for _ in range(3)]
    for i, p in enumerate(pods):
        server.add(f"uid-{i}", f"/run/netns/{p}", info("a"))
        server.add(f"uid-{i}", f"/run/netns/{p}", info("a"))  # no-op: its fd is closed
    # Per pod: five listeners and the pod netns handle.
    assert len(os.listdir(fds)) == before + 6 * len(pods)
    for i in range(len(pods)):
        server.delete(f"uid-{i}")
    assert wait_for(lambda: len(os.listdir(fds)) == before)
