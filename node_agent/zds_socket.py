"""ZDS packets on a ``SOCK_SEQPACKET`` socket, with SCM_RIGHTS fds (SPEC §5).

Invariants:
- one protobuf message (:mod:`node_agent.zds_wire`) per packet, no length prefix, at most
  :data:`~node_agent.zds_wire.MAX_MESSAGE` bytes; a packet the kernel had to truncate
  (``MSG_TRUNC``) or whose control data was cut (``MSG_CTRUNC``) is a
  :class:`~node_agent.zds_wire.ZdsProtocolError`;
- an Add carries exactly one fd in the same ``sendmsg``; no other message carries one;
- every fd received is owned by the caller of :func:`recv_packet`, and is closed here when
  the packet is rejected, so a misbehaving peer can never leak descriptors into us.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
from dataclasses import dataclass, field

from node_agent.zds_wire import MAX_MESSAGE, ZdsClosedError, ZdsProtocolError

# Room for a few fds: a peer sending more than one must not be able to hide the extra ones
# behind MSG_CTRUNC (we would not see them to close them).
_MAX_FDS = 8


@dataclass
class Packet:
    """One received packet: its bytes and the fds that came with it (caller closes them)."""

    data: bytes
    fds: list[int] = field(default_factory=list)

    def close_fds(self) -> None:
        for fd in self.fds:
            _close_quietly(fd)
        self.fds = []


def send_packet(sock: socket.socket, data: bytes, fd: int | None = None, *, timeout: float) -> None:
    """Send ``data`` as one packet (with ``fd`` as SCM_RIGHTS when given) within ``timeout``."""
    ancillary = []
    if fd is not None:
        ancillary.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes()))
    sock.settimeout(timeout)
    try:
        sent = sock.sendmsg([data], ancillary)
    except TimeoutError:
        raise ZdsClosedError(f"write deadline ({timeout:g}s) exceeded: peer not reading") from None
    except OSError as e:
        raise ZdsClosedError(f"write failed: {e.strerror or e}") from None
    if sent != len(data):  # cannot happen on SEQPACKET, but never assume
        raise ZdsClosedError(f"short write: {sent} of {len(data)} bytes")


def recv_packet(sock: socket.socket, *, timeout: float | None) -> Packet:
    """Receive one packet within ``timeout`` (None blocks). Raises :class:`ZdsClosedError` on
    EOF, socket errors and timeout (``TimeoutError`` cause), :class:`ZdsProtocolError` on a
    truncated packet or control message (any fds that did arrive are closed first)."""
    sock.settimeout(timeout)
    try:
        data, ancdata, flags, _ = sock.recvmsg(
            MAX_MESSAGE, socket.CMSG_SPACE(_MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC
        )
    except TimeoutError as e:
        raise ZdsClosedError(f"read deadline ({timeout:g}s) exceeded") from e
    except OSError as e:
        raise ZdsClosedError(f"read failed: {e.strerror or e}") from None
    pkt = Packet(data, _fds_from(ancdata))
    if flags & socket.MSG_TRUNC:
        pkt.close_fds()
        raise ZdsProtocolError(f"packet over {MAX_MESSAGE} bytes (truncated)")
    if flags & socket.MSG_CTRUNC:
        pkt.close_fds()
        raise ZdsProtocolError("control message truncated (too many fds attached)")
    if not data and not pkt.fds:
        raise ZdsClosedError("peer closed the connection (EOF)")
    return pkt


def _fds_from(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - (len(payload) % arr.itemsize)])
            fds.extend(arr)
    return fds


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
