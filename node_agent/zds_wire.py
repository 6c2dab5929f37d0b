"""ZDS on the wire: message encoding (pure) and one-packet I/O with SCM_RIGHTS (SPEC §5).

Shared by both ends (the agent's :mod:`node_agent.zds_server` and the testbed's ztunnel
stand-in), so the two can never disagree on framing. Invariants:

- one protobuf message per ``SOCK_SEQPACKET`` packet, no length prefix, at most
  :data:`MAX_MESSAGE` (1024) bytes; a packet the kernel had to truncate (``MSG_TRUNC``) or
  whose control data was cut (``MSG_CTRUNC``) is a :class:`ZdsProtocolError`;
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

from google.protobuf.message import DecodeError

from cni_plugin.errors import IstioCniError
from node_agent import zds_pb2 as pb

MAX_MESSAGE = 1024
# Room for a few fds: a peer sending more than one must not be able to hide the extra ones
# behind MSG_CTRUNC (we would not see them to close them).
_MAX_FDS = 8


class ZdsProtocolError(IstioCniError):
    """The peer broke the ZDS protocol (bad bytes, wrong message, stray fd). Drop it."""


class ZdsClosedError(IstioCniError):
    """The peer closed the connection (EOF) or it failed at the socket level."""


@dataclass
class Packet:
    """One received packet: its bytes and the fds that came with it (caller closes them)."""

    data: bytes
    fds: list[int] = field(default_factory=list)

    def close_fds(self) -> None:
        for fd in self.fds:
            _close_quietly(fd)
        self.fds = []


# --- encoding (pure) ---------------------------------------------------------------------------


def encode_hello(version: pb.Version = pb.V1) -> bytes:
    return pb.ZdsHello(version=version).SerializeToString()


def encode_add(uid: str, name: str, namespace: str, service_account: str) -> bytes:
    info = pb.WorkloadInfo(name=name, namespace=namespace, service_account=service_account)
    return _request(pb.WorkloadRequest(add=pb.AddWorkload(uid=uid, workload_info=info)))


def encode_keep(uid: str) -> bytes:
    return _request(pb.WorkloadRequest(keep=pb.KeepWorkload(uid=uid)))


def encode_del(uid: str) -> bytes:
    req = pb.WorkloadRequest()
    getattr(req, "del").uid = uid  # `del` is a Python keyword
    return _request(req)


def encode_snapshot_sent() -> bytes:
    return _request(pb.WorkloadRequest(snapshot_sent=pb.SnapshotSent()))


def encode_ack(error: str = "") -> bytes:
    data = pb.WorkloadResponse(ack=pb.Ack(error=error)).SerializeToString()
    if len(data) > MAX_MESSAGE:
        # Keep the nack inside one packet: the message is informative, not load-bearing.
        data = pb.WorkloadResponse(ack=pb.Ack(error=error[: MAX_MESSAGE - 16])).SerializeToString()
    return data


def _request(req: pb.WorkloadRequest) -> bytes:
    data = req.SerializeToString()
    if len(data) > MAX_MESSAGE:
        raise ZdsProtocolError(
            f"ZDS request is {len(data)} bytes, over the {MAX_MESSAGE}-byte packet limit "
            "(a pod name, namespace, service account or uid is unreasonably long)"
        )
    return data


# --- decoding (pure) ---------------------------------------------------------------------------


def decode_hello(data: bytes) -> int:
    """The version of a ``ZdsHello``; only V1 is accepted."""
    msg = pb.ZdsHello()
    _parse(msg, data, "ZdsHello")
    if msg.version != pb.V1:
        raise ZdsProtocolError(f"unsupported ZDS version {msg.version} in hello (want V1=1)")
    return msg.version


def decode_ack(data: bytes) -> str:
    """The error text of a ``WorkloadResponse{ack}``; empty string means success."""
    msg = pb.WorkloadResponse()
    _parse(msg, data, "WorkloadResponse")
    if msg.WhichOneof("payload") != "ack":
        raise ZdsProtocolError(f"expected an ack, got {data[:32].hex()!r}")
    return msg.ack.error


def decode_request(data: bytes) -> pb.WorkloadRequest:
    msg = pb.WorkloadRequest()
    _parse(msg, data, "WorkloadRequest")
    if msg.WhichOneof("payload") is None:
        raise ZdsProtocolError(f"WorkloadRequest without payload: {data[:32].hex()!r}")
    return msg


def _parse(
    msg: pb.ZdsHello | pb.WorkloadResponse | pb.WorkloadRequest, data: bytes, what: str
) -> None:
    try:
        msg.ParseFromString(data)
    except DecodeError as e:
        raise ZdsProtocolError(f"cannot decode {what} from {data[:32].hex()!r}: {e}") from None


# --- one-packet I/O ----------------------------------------------------------------------------


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
