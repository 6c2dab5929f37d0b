"""One ztunnel connection on the agent's side of ZDS, served by its own thread.

Owned by :class:`node_agent.zds_server.ZdsServer` (see its docstring for the protocol). A
connection waits for the hello, reports itself ready, sends the snapshot, then serves
queued requests one at a time with write and ack deadlines, checking liveness between them
as Istio does. It never raises to its owner: every failure ends this connection only, with
one log line naming the peer, and answers every request still queued.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import struct
import threading
from typing import TYPE_CHECKING, Protocol

from cni_plugin.errors import IstioCniError, NetnsError, ZtunnelUnavailableError
from cni_plugin.netns import Netns
from node_agent import zds_socket
from node_agent import zds_wire as wire

if TYPE_CHECKING:
    from node_agent.zds_server import SnapshotEntry, SnapshotSource

log = logging.getLogger("node_agent.zds")

KEEPALIVE_READ = 0.01  # Istio's CheckAlive(time.Second / 100)


class ConnectionOwner(Protocol):
    """What a connection needs from the server that accepted it."""

    hello_timeout: float
    ack_timeout: float
    keepalive_interval: float
    snapshot_source: SnapshotSource

    def connection_ready(self, conn: Connection) -> None: ...

    def connection_ended(self, conn: Connection, was_ready: bool) -> None: ...


class Request:
    """One message for one connection, answered once. The netns (if any) is shared by the
    caller and the connection thread and closed by whichever releases it last, so the fd can
    never be closed (and its number reused) while a ``sendmsg`` may still attach it."""

    def __init__(self, data: bytes, what: str, netns: Netns | None = None) -> None:
        self.data = data
        self.what = what
        self._netns = netns
        self._refs = 2 if netns is not None else 0
        self._lock = threading.Lock()
        self._done = threading.Event()
        self.cancelled = False
        self.ack_error: str | None = None
        self.failure: IstioCniError | None = None

    @property
    def fd(self) -> int | None:
        return self._netns.fd if self._netns is not None else None

    def take(self) -> bool:
        """Connection thread: claim the request for sending (False when the caller gave up)."""
        with self._lock:
            return not self.cancelled

    def resolve(self, ack_error: str | None, failure: IstioCniError | None = None) -> None:
        self.ack_error, self.failure = ack_error, failure
        self._done.set()
        self.release()

    def wait(self, timeout: float) -> bool:
        done = self._done.wait(timeout)
        if not done:
            with self._lock:
                self.cancelled = True
        self.release()
        return done

    def release(self) -> None:
        with self._lock:
            if self._refs == 0:
                return
            self._refs -= 1
            if self._refs == 0 and self._netns is not None:
                self._netns.close()


_STOP = object()


class Connection:
    """One accepted ztunnel connection, served by its own thread."""

    def __init__(self, server: ConnectionOwner, sock: socket.socket, number: int) -> None:
        self.server = server
        self.sock = sock
        self.peer = f"conn={number} {peer_creds(sock)}"
        self.requests: queue.SimpleQueue[Request | object] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=f"zds-{number}", daemon=True)
        self._closing = False
        self._finished = False
        self._submit_lock = threading.Lock()

    def submit(self, req: Request) -> None:
        with self._submit_lock:
            if not self._finished:
                self.requests.put(req)
                return
        # The connection already ended: answer now instead of letting the caller time out.
        req.resolve(
            None,
            ZtunnelUnavailableError(
                f"ztunnel connection {self.peer} closed before {req.what} was sent; "
                "retry once ztunnel reconnects"
            ),
        )

    def shutdown(self) -> None:
        """From another thread: wake the connection thread so it ends (it closes the fd)."""
        self._closing = True
        self.requests.put(_STOP)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def _run(self) -> None:
        registered = False
        try:
            pkt = zds_socket.recv_packet(self.sock, timeout=self.server.hello_timeout)
            if pkt.fds:
                pkt.close_fds()
                raise wire.ZdsProtocolError("ztunnel attached an fd to its hello")
            version = wire.decode_hello(pkt.data)
            log.info(
                "ztunnel said hello", extra={"fields": {"peer": self.peer, "version": version}}
            )
            self.server.connection_ready(self)
            registered = True
            self._send_snapshot()
            self._serve()
        except (wire.ZdsProtocolError, wire.ZdsClosedError) as e:
            if not self._closing:
                level = logging.INFO if isinstance(e, wire.ZdsClosedError) else logging.WARNING
                log.log(
                    level,
                    "ztunnel connection dropped",
                    extra={"fields": {"peer": self.peer, "reason": str(e)}},
                )
        except Exception as e:  # never let one connection take the agent down
            log.error(
                "ztunnel connection failed unexpectedly",
                extra={"fields": {"peer": self.peer, "reason": f"{type(e).__name__}: {e}"}},
            )
        finally:
            self.server.connection_ended(self, registered)
            self._fail_queued()
            self.sock.close()

    def _send_snapshot(self) -> None:
        entries = self.server.snapshot_source.snapshot()
        for e in entries:
            req = self._snapshot_request(e)
            err = self._exchange(req)
            if err:
                log.error(
                    "ztunnel rejected a snapshot entry",
                    extra={"fields": {"peer": self.peer, "uid": e.uid, "ack_error": err}},
                )
        self._exchange(Request(wire.encode_snapshot_sent(), "snapshot_sent"))
        log.info(
            "snapshot sent to ztunnel",
            extra={"fields": {"peer": self.peer, "pods": len(entries)}},
        )

    def _snapshot_request(self, e: SnapshotEntry) -> Request:
        i = e.info
        if e.netns_path is not None:
            try:
                ns = Netns.open(e.netns_path)
            except NetnsError as err:
                log.warning(
                    "pod netns unavailable for snapshot, sending keep",
                    extra={"fields": {"uid": e.uid, "reason": str(err)}},
                )
            else:
                req = Request(
                    wire.encode_add(e.uid, i.name, i.namespace, i.service_account),
                    f"add {e.uid}",
                    ns,
                )
                req.release()  # the snapshot has no waiting caller
                return req
        return Request(wire.encode_keep(e.uid), f"keep {e.uid}")

    def _exchange(self, req: Request) -> str:
        """Send one request and return its ack text; the connection is dropped on failure."""
        try:
            zds_socket.send_packet(self.sock, req.data, req.fd, timeout=self.server.ack_timeout)
            while True:
                pkt = zds_socket.recv_packet(self.sock, timeout=self.server.ack_timeout)
                if pkt.fds:
                    pkt.close_fds()
                    raise wire.ZdsProtocolError(
                        f"ztunnel attached an fd to its answer to {req.what}"
                    )
                err = wire.decode_ack(pkt.data)
                req.resolve(err)
                return err
        except (wire.ZdsProtocolError, wire.ZdsClosedError) as e:
            req.resolve(
                None,
                ZtunnelUnavailableError(
                    f"ztunnel ({self.peer}) did not acknowledge {req.what}: {e}; the connection "
                    "was dropped, retry once ztunnel reconnects"
                ),
            )
            raise

    def _serve(self) -> None:
        interval = self.server.keepalive_interval
        while True:
            try:
                item = self.requests.get(timeout=interval)
            except queue.Empty:
                self._check_alive()
                continue
            if item is _STOP:
                raise wire.ZdsClosedError("server stopping")
            assert isinstance(item, Request)
            if item.take():
                self._exchange(item)
            else:
                item.release()  # the caller gave up before it was sent

    def _check_alive(self) -> None:
        try:
            pkt = zds_socket.recv_packet(self.sock, timeout=KEEPALIVE_READ)
        except wire.ZdsClosedError as e:
            if isinstance(e.__cause__, TimeoutError):
                return  # nothing to read: alive
            raise
        pkt.close_fds()
        raise wire.ZdsProtocolError(f"unexpected unprompted message {pkt.data[:32].hex()!r}")

    def _fail_queued(self) -> None:
        with self._submit_lock:
            self._finished = True  # later submits are answered at once
        while True:
            try:
                item = self.requests.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, Request):
                item.resolve(
                    None,
                    ZtunnelUnavailableError(
                        f"ztunnel connection {self.peer} closed before {item.what} was sent; "
                        "retry once ztunnel reconnects"
                    ),
                )


def peer_creds(sock: socket.socket) -> str:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
    except OSError:
        return "pid=? uid=?"
    return f"pid={pid} uid={uid} gid={gid}"
