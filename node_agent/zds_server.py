"""The node agent's side of ZDS: a server ztunnel connects to (SPEC §5).

API (what the agent calls)::

    server = ZdsServer(socket_path, snapshot_source, on_connected_change=gauge_setter)
    server.start()                      # bind, listen, serve in background threads
    server.add(uid, netns_path, WorkloadInfo(name, namespace, service_account))
    server.delete(uid)                  # Del to every connection; errors logged only
    server.connected                    # at least one ztunnel said hello and is being served
    server.stop()                       # close everything, unlink the socket

``add`` sends Add plus the pod's netns fd (opened with :meth:`Netns.open`, never created) to
the *newest* connection and waits for its ack; ``add_netns`` does the same with a handle the
caller passes (ownership moves to the server, which closes it on every path). They raise
:class:`ZtunnelUnavailableError` when no ztunnel is connected or none answered in time,
:class:`ZtunnelRejectedError` with ztunnel's own text when the ack carries an error, and
:class:`NetnsError` when the path is not an openable network namespace.
``snapshot_source.snapshot()`` is read once per connection, after its hello: an entry with a
namespace handle becomes Add+fd, an entry without one becomes Keep{uid}; then SnapshotSent.
The snapshot holds the namespaces themselves (handles the snapshot owns, duplicated from the
pod cache's when it was taken), never paths: the snapshot is sent one ack at a time, and
meanwhile removals close cache fds whose numbers new enrolments reuse, so a path re-opened
later could name another pod's namespace. The connection closes every handle it was given,
sent or not, on every path.

Per connection, as Istio's ``cni/pkg/nodeagent/ztunnelserver.go`` does: wait up to
``hello_timeout`` for ``ZdsHello{V1}``, send the snapshot, then serve one request at a time
(write deadline and ack deadline ``ack_timeout`` each). A connection counts for routing only
after its hello, so a peer that never says hello cannot swallow Adds. Anything ztunnel sends
besides the awaited ack, EOF, a missed deadline or a bad packet drops that connection only
(with a log line naming the peer's pid/uid); the agent and other connections carry on. One
deliberate difference from Istio: Istio keeps a connection whose ack timed out; here it is
dropped, because a late ack would otherwise be taken as the answer to the next request.

Keepalive, as in Istio (the SPEC has none beyond deadlines): ztunnel never speaks unprompted,
so after ``keepalive_interval`` (Istio: 5 s) without a request the connection does a 10 ms
read; a timeout means alive, EOF means gone, any data is a protocol error. Istio also
rate-limits accepts to 5 per second (burst 1) so a ztunnel reconnecting in a loop cannot
exhaust the agent; ``accept_rate`` keeps that, defaulting to the same.

Socket permissions: ztunnel runs as root in Istio's chart (``runAsUser: 0``, ``runAsGroup:
1337``, capabilities instead of privileged), so by default the socket is ``0600`` and, when
this server creates its directory, the directory is ``0700``: only root may connect. An
existing directory (the ``/var/run/ztunnel`` hostPath, which kubelet creates ``0755``) is
left as is, with a warning if others could write to it and so replace the socket. With
``socket_group`` (a gid or group name: for a ztunnel running as another user) the socket
is ``0660`` and a created directory ``0710`` with that group: members may connect but not
list or replace entries. The socket is bound under a temporary name,
given its mode and group, then renamed over the final path, so it is never connectable with
looser permissions, and a stale file is replaced atomically. Beyond file permissions, each
accepted peer's SO_PEERCRED uid must be ``peer_uid`` (0 by default, ztunnel's; the agent
sets it from ``ZTUNNEL_UID``; None accepts any): any other peer is logged and dropped
before its hello. A path a live agent still
serves (a connect succeeds) is refused with :class:`ConfigError`.
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn, Protocol

from cni_plugin.errors import (
    ConfigError,
    ZtunnelRejectedError,
    ZtunnelUnavailableError,
)
from cni_plugin.netns import Netns
from node_agent import zds_wire as wire
from node_agent.zds_connection import Connection, Request, peer_creds, peer_uid

log = logging.getLogger("node_agent.zds")

KEEPALIVE_INTERVAL = 5.0  # Istio's defaultZTunnelKeepAliveCheckInterval


@dataclass(frozen=True)
class WorkloadInfo:
    name: str
    namespace: str
    service_account: str


@dataclass(frozen=True)
class SnapshotEntry:
    """A pod the agent has enrolled. ``netns`` is a handle owned by the entry (whoever takes
    the snapshot closes it); None means unknown: sent as Keep{uid}."""

    uid: str
    info: WorkloadInfo
    netns: Netns | None


class SnapshotSource(Protocol):
    def snapshot(self) -> list[SnapshotEntry]: ...


class ZdsServer:
    """Serves ZDS to ztunnel; see the module docstring for the contract."""

    def __init__(
        self,
        socket_path: str,
        snapshot_source: SnapshotSource,
        *,
        ack_timeout: float = 5.0,
        hello_timeout: float = 5.0,
        on_connected_change: Callable[[bool], None] | None = None,
        socket_group: int | str | None = None,
        keepalive_interval: float = KEEPALIVE_INTERVAL,
        accept_rate: float = 5.0,
        peer_uid: int | None = 0,
    ) -> None:
        self.socket_path = os.path.abspath(socket_path)
        self.snapshot_source = snapshot_source
        self.ack_timeout = ack_timeout
        self.hello_timeout = hello_timeout
        self.keepalive_interval = keepalive_interval
        self.accept_rate = accept_rate
        self.peer_uid = peer_uid
        self.refused_peers = 0
        self._on_connected_change = on_connected_change
        self._gid = _resolve_group(socket_group)
        self._lock = threading.Lock()
        self._ready: list[Connection] = []  # said hello, oldest first
        self._all: set[Connection] = set()
        self._listener: socket.socket | None = None
        self._bound_ino: int | None = None
        self._accept_thread: threading.Thread | None = None
        self._stopping = False
        self._count = 0

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        if self._listener is not None:
            raise ConfigError("ZDS server already started")
        directory = os.path.dirname(self.socket_path)
        self._prepare_directory(directory)
        self._refuse_live_agent()
        tmp = f"{self.socket_path}.tmp-{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.bind(tmp)
            os.chmod(tmp, 0o660 if self._gid is not None else 0o600)
            if self._gid is not None:
                os.chown(tmp, 0, self._gid)
            sock.listen(16)
            os.rename(tmp, self.socket_path)  # atomic: replaces a stale socket file
            self._bound_ino = os.stat(self.socket_path).st_ino
        except OSError as e:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise ConfigError(
                f"cannot listen for ztunnel on {self.socket_path}: {e.strerror or e}; check that "
                "the directory is writable by this agent (ZTUNNEL_UDS_ADDRESS)"
            ) from None
        self._listener = sock
        self._stopping = False
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name="zds-accept", daemon=True
        )
        self._accept_thread.start()
        log.info("zds server listening", extra={"fields": {"socket": self.socket_path}})

    def stop(self) -> None:
        listener = self._listener
        if listener is None:
            return
        self._stopping = True
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        if self._accept_thread is not None:
            self._accept_thread.join()
        listener.close()
        self._listener = None
        with contextlib.suppress(OSError):
            # Only unlink our own socket: a newer agent may already have replaced it.
            if os.stat(self.socket_path).st_ino == self._bound_ino:
                os.unlink(self.socket_path)
        with self._lock:
            conns = list(self._all)
        for c in conns:
            c.shutdown()
        for c in conns:
            c.thread.join()
        log.info("zds server stopped", extra={"fields": {"socket": self.socket_path}})

    @property
    def connected(self) -> bool:
        with self._lock:
            return bool(self._ready)

    @property
    def connection_count(self) -> int:
        """Connections that said hello (Istio's ``ztunnel_connected`` gauge value)."""
        with self._lock:
            return len(self._ready)

    # --- requests -------------------------------------------------------------------------

    def add(
        self, uid: str, netns_path: str, info: WorkloadInfo, timeout: float | None = None
    ) -> None:
        """Send Add and wait for the ack, up to ``timeout`` (default: the ack deadline)."""
        if not self.connected:
            self._no_ztunnel()
        self.add_netns(uid, Netns.open(netns_path), info, timeout)

    def add_netns(
        self, uid: str, ns: Netns, info: WorkloadInfo, timeout: float | None = None
    ) -> None:
        """:meth:`add` with an open handle; the server owns ``ns`` from here on."""
        timeout = self.ack_timeout if timeout is None else timeout
        data = wire.encode_add(uid, info.name, info.namespace, info.service_account)
        with self._lock:
            conn = self._ready[-1] if self._ready else None
        if conn is None:
            ns.close()
            self._no_ztunnel()
        req = Request(data, f"add {uid}", ns)
        conn.submit(req)
        if not req.wait(timeout):
            raise ZtunnelUnavailableError(
                f"ztunnel ({conn.peer}) did not acknowledge add {uid} within {timeout:g}s; "
                "retry later"
            )
        if req.failure is not None:
            raise req.failure
        if req.ack_error:
            raise ZtunnelRejectedError(f"ztunnel rejected pod {uid}: {req.ack_error}")

    def _no_ztunnel(self) -> NoReturn:
        raise ZtunnelUnavailableError(
            f"no ztunnel is connected to {self.socket_path}: the pod stays pending until "
            "ztunnel connects (check that ztunnel runs on this node)"
        )

    def delete(self, uid: str) -> None:
        data = wire.encode_del(uid)
        with self._lock:
            conns = list(self._ready)
        pending = []
        for c in conns:
            req = Request(data, f"del {uid}")
            c.submit(req)
            pending.append((c, req))
        deadline = time.monotonic() + 2 * self.ack_timeout + 1
        for c, req in pending:
            if not req.wait(max(0.0, deadline - time.monotonic())):
                log.warning(
                    "ztunnel did not acknowledge del in time",
                    extra={"fields": {"peer": c.peer, "uid": uid}},
                )
            elif req.failure is not None or req.ack_error:
                log.warning(
                    "ztunnel del failed",
                    extra={
                        "fields": {
                            "peer": c.peer,
                            "uid": uid,
                            "reason": str(req.failure) if req.failure else req.ack_error,
                        }
                    },
                )

    # --- internals ------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        gap = 1.0 / self.accept_rate if self.accept_rate > 0 else 0.0
        next_ok = 0.0
        while not self._stopping:
            wait = next_ok - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            try:
                sock, _ = listener.accept()
            except OSError:
                if self._stopping:
                    return
                log.error("zds accept failed", exc_info=True)
                time.sleep(0.1)
                continue
            next_ok = time.monotonic() + gap
            sock.set_inheritable(False)
            if not self._peer_allowed(sock):
                sock.close()
                continue
            with self._lock:
                if self._stopping:
                    sock.close()
                    return
                self._count += 1
                conn = Connection(self, sock, self._count)
                self._all.add(conn)
            log.debug("ztunnel connection accepted", extra={"fields": {"peer": conn.peer}})
            conn.thread.start()

    def _peer_allowed(self, sock: socket.socket) -> bool:
        """Only ztunnel's identity may speak ZDS: a connection from any other uid is
        dropped before it can say hello (and so before it could receive a pod's netns)."""
        if self.peer_uid is None:
            return True
        uid = peer_uid(sock)
        if uid == self.peer_uid:
            return True
        self.refused_peers += 1
        log.warning(
            "zds connection from an unexpected peer dropped: only ztunnel's uid may connect "
            "(set ZTUNNEL_UID if ztunnel runs as another user)",
            extra={"fields": {"peer": peer_creds(sock), "expected_uid": self.peer_uid}},
        )
        return False

    def connection_ready(self, conn: Connection) -> None:
        with self._lock:
            self._ready.append(conn)
            first = len(self._ready) == 1
        log.info("ztunnel connected", extra={"fields": {"peer": conn.peer}})
        if first:
            self._notify(True)

    def connection_ended(self, conn: Connection, was_ready: bool) -> None:
        with self._lock:
            self._all.discard(conn)
        if was_ready:
            self._unregister(conn)

    def _unregister(self, conn: Connection) -> None:
        with self._lock:
            self._ready.remove(conn)
            last = not self._ready
        log.info("ztunnel disconnected", extra={"fields": {"peer": conn.peer}})
        if last:
            self._notify(False)

    def _notify(self, connected: bool) -> None:
        if self._on_connected_change is None:
            return
        try:
            self._on_connected_change(connected)
        except Exception:
            log.error("on_connected_change callback failed", exc_info=True)

    def _prepare_directory(self, directory: str) -> None:
        if not os.path.isdir(directory):
            try:
                os.makedirs(directory, mode=0o700, exist_ok=True)
                os.chmod(directory, 0o710 if self._gid is not None else 0o700)
                if self._gid is not None:
                    os.chown(directory, 0, self._gid)
            except OSError as e:
                raise ConfigError(
                    f"cannot create ZDS socket directory {directory}: {e.strerror or e}"
                ) from None
            return
        mode = os.stat(directory).st_mode
        if mode & (stat.S_IWGRP | stat.S_IWOTH):
            log.warning(
                "zds socket directory is writable by others: anyone able to write there could "
                "replace the socket; make it 0700 (or 0710 with ztunnel's group)",
                extra={"fields": {"directory": directory, "mode": oct(mode & 0o7777)}},
            )

    def _refuse_live_agent(self) -> None:
        path = self.socket_path
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            raise ConfigError(
                f"{path} is a directory, not a socket: remove it or choose "
                "another ZTUNNEL_UDS_ADDRESS"
            )
        if not stat.S_ISSOCK(st.st_mode):
            return  # a stale non-socket file: replaced by the rename
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            probe.settimeout(1.0)
            probe.connect(path)
        except OSError:
            return  # ECONNREFUSED: nobody listens, the file is stale
        else:
            holder = peer_creds(probe)
            raise ConfigError(
                f"another live node agent ({holder}) is serving ZDS on {path}: stop it first "
                "or choose another ZTUNNEL_UDS_ADDRESS"
            )
        finally:
            probe.close()


def _resolve_group(group: int | str | None) -> int | None:
    if group is None or isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"socket group {group!r} does not exist on this node") from None
