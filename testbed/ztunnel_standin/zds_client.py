"""ztunnel's end of ZDS (``src/inpod/workloadmanager.rs``, ``protocol.rs``), for the testbed.

Connects to the agent's socket, retrying with ztunnel's backoff (10 ms doubled before each
wait, capped at 15 s), says ``ZdsHello{V1}`` and answers every request with one ack:

- an unreadable packet (garbage, truncated, more than one fd, an fd on anything but Add, an
  Add without fd) -> nack ``failure to read message`` and reconnect;
- a protocol error (Add without workload_info, second SnapshotSent, Keep after the
  snapshot, Del before it) -> nack and reconnect;
- a proxy that cannot start -> nack, stay connected, retry it every 5 s;
- otherwise an empty ack once the work is done (listeners open, proxy stopped).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading

from node_agent import zds_socket
from node_agent import zds_wire as wire
from node_agent.zds_pb2 import WorkloadRequest
from testbed.ztunnel_standin.workloads import ProxyStartError, WorkloadManager

log = logging.getLogger("testbed.ztunnel_standin")

INITIAL_BACKOFF = 0.01
MAX_BACKOFF = 15.0
WRITE_TIMEOUT = 5.0
RETRY_INTERVAL = 5.0  # ztunnel's RETRY_DURATION for proxies that failed to start


class ZdsClient:
    def __init__(self, socket_path: str, manager: WorkloadManager) -> None:
        self.socket_path = socket_path
        self.manager = manager
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self.connections = 0  # completed connects, for tests and logs

    def run(self) -> None:
        """Serve until :meth:`stop`; reconnects after every disconnect."""
        while not self._stop.is_set():
            sock = self._connect()
            if sock is None:
                return
            try:
                self._process(sock)
            except (wire.ZdsClosedError, wire.ZdsProtocolError) as e:
                if not self._stop.is_set():
                    log.info("zds stream ended", extra={"fields": {"reason": str(e)}})
            except Exception:  # never let the stand-in stop serving: reconnect
                log.exception("zds stream failed")
                self._stop.wait(INITIAL_BACKOFF)
            finally:
                with self._lock:
                    self._sock = None
                sock.close()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)

    def _connect(self) -> socket.socket | None:
        backoff = INITIAL_BACKOFF
        while not self._stop.is_set():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            try:
                s.connect(self.socket_path)
            except OSError as e:
                s.close()
                backoff = min(MAX_BACKOFF, backoff * 2)
                log.debug(
                    "failed to connect to the node agent, retrying",
                    extra={"fields": {"error": str(e), "retry_in_s": backoff}},
                )
                self._stop.wait(backoff)
                continue
            with self._lock:
                if self._stop.is_set():
                    s.close()
                    return None
                self._sock = s
            self.connections += 1
            log.info("connected to the node agent", extra={"fields": {"socket": self.socket_path}})
            return s
        return None

    def _process(self, sock: socket.socket) -> None:
        self.manager.reset_snapshot()
        zds_socket.send_packet(sock, wire.encode_hello(), timeout=WRITE_TIMEOUT)
        while True:
            try:
                # With pods pending, wake up to retry them (ztunnel: every 5 s).
                wait = RETRY_INTERVAL if self.manager.pending else None
                pkt = zds_socket.recv_packet(sock, timeout=wait)
            except wire.ZdsClosedError as e:
                if isinstance(e.__cause__, TimeoutError):
                    self.manager.retry_pending()
                    continue
                raise
            try:
                req = wire.decode_request(pkt.data)
                kind = req.WhichOneof("payload")
                if kind == "add":
                    if len(pkt.fds) != 1:
                        raise wire.ZdsProtocolError(f"add with {len(pkt.fds)} fds (want 1)")
                elif pkt.fds:
                    raise wire.ZdsProtocolError(f"unexpected fd attached to {kind}")
            except wire.ZdsProtocolError as e:
                pkt.close_fds()
                self._nack(sock, f"failure to read message: {e}")
                raise
            try:
                self._handle(req, kind, pkt.fds)
            except ProxyStartError as e:
                self._nack(sock, str(e))
                continue
            except wire.ZdsProtocolError as e:
                self._nack(sock, f"failure to process message: {e}")
                raise
            except Exception as e:  # a bug or an odd fd: report it, keep serving
                log.exception("request failed", extra={"fields": {"kind": kind}})
                self._nack(sock, f"failure to process message: {type(e).__name__}: {e}")
                continue
            zds_socket.send_packet(sock, wire.encode_ack(), timeout=WRITE_TIMEOUT)

    def _handle(self, req: WorkloadRequest, kind: str | None, fds: list[int]) -> None:
        m = self.manager
        if kind == "add":
            if not req.add.HasField("workload_info"):
                zds_socket.Packet(b"", fds).close_fds()
                raise wire.ZdsProtocolError(f"add for {req.add.uid} without workload_info")
            i = req.add.workload_info
            m.add(req.add.uid, i.name, i.namespace, i.service_account, fds[0])
        elif kind == "keep":
            m.keep(req.keep.uid)
        elif kind == "del":
            m.delete(getattr(req, "del").uid)
        elif kind == "snapshot_sent":
            m.snapshot_sent()
        else:
            raise wire.ZdsProtocolError(f"unknown request {kind}")

    def _nack(self, sock: socket.socket, text: str) -> None:
        log.warning("nack", extra={"fields": {"error": text}})
        with contextlib.suppress(wire.ZdsClosedError):
            zds_socket.send_packet(sock, wire.encode_ack(text), timeout=WRITE_TIMEOUT)
