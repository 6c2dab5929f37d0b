"""ZDS messages (SPEC §5): encoding and decoding, pure (no socket, no fd).

Shared by both ends (the agent's :mod:`node_agent.zds_server` and the testbed's ztunnel
stand-in), so the two can never disagree on a message; one message per packet, at most
:data:`MAX_MESSAGE` (1024) bytes. Sending and receiving packets with their fds is
:mod:`node_agent.zds_socket`.
"""

from __future__ import annotations

from google.protobuf.message import DecodeError

from cni_plugin.errors import IstioCniError
from node_agent import zds_pb2 as pb

MAX_MESSAGE = 1024


class ZdsProtocolError(IstioCniError):
    """The peer broke the ZDS protocol (bad bytes, wrong message, stray fd). Drop it."""


class ZdsClosedError(IstioCniError):
    """The peer closed the connection (EOF) or it failed at the socket level."""


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
