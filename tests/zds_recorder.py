"""A minimal ztunnel for agent tests: connects to the agent's real ZDS socket, says hello,
acks every request and records it (kind, uid, netns inode of the fd it received).

Not a dataplane: the testbed tests use ``testbed.ztunnel_standin`` for real traffic. This
one lets netns tests assert exactly what the agent sent (snapshot contents, Add fds, Dels).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass

from node_agent import zds_socket
from node_agent import zds_wire as w


@dataclass(frozen=True)
class Seen:
    kind: str  # add | keep | del | snapshot_sent
    uid: str
    inode: int | None
    connection: int


class ZdsRecorder:
    def __init__(self, socket_path: str, reject: set[str] | None = None) -> None:
        self.socket_path = socket_path
        self.reject = reject or set()
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.connections = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="zds-recorder", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        s = self._sock
        if s is not None:
            s.close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def of(self, kind: str) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if s.kind == kind]

    def _run(self) -> None:
        while not self._stop.is_set():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                sock.connect(self.socket_path)
            except OSError:
                sock.close()
                time.sleep(0.05)  # the agent is not listening yet (or restarting)
                continue
            self._sock = sock
            self.connections += 1
            conn = self.connections
            try:
                zds_socket.send_packet(sock, w.encode_hello(), timeout=2)
                while not self._stop.is_set():
                    pkt = zds_socket.recv_packet(sock, timeout=None)
                    req = w.decode_request(pkt.data)
                    kind = req.WhichOneof("payload") or ""
                    inode = os.fstat(pkt.fds[0]).st_ino if pkt.fds else None
                    pkt.close_fds()
                    uid = ""
                    if kind == "add":
                        uid = req.add.uid
                    elif kind == "del":
                        uid = req.__getattribute__("del").uid
                    elif kind == "keep":
                        uid = req.keep.uid
                    with self._lock:
                        self.seen.append(Seen(kind, uid, inode, conn))
                    err = "rejected by test" if uid in self.reject and kind == "add" else ""
                    zds_socket.send_packet(sock, w.encode_ack(err), timeout=2)
            except (w.ZdsClosedError, w.ZdsProtocolError, OSError):
                pass
            finally:
                sock.close()
                self._sock = None
            time.sleep(0.05)
