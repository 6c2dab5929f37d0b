"""ZDS framing against the SPEC's byte encodings, and one-packet I/O over a real socketpair."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from node_agent import zds_pb2 as pb
from node_agent import zds_socket
from node_agent import zds_wire as w


def test_known_encodings_from_spec() -> None:
    assert w.encode_hello() == bytes.fromhex("0801")
    assert w.encode_ack() == bytes.fromhex("0a00")
    assert w.encode_snapshot_sent() == bytes.fromhex("1a00")


def test_add_keep_del_bytes_follow_field_table() -> None:
    # WorkloadRequest.add=1 { uid=1 "u1", workload_info=2 { name=1, namespace=2, sa=3 } }
    info = b"\x0a\x01n" + b"\x12\x02ns" + b"\x1a\x02sa"
    add = b"\x0a\x02u1" + b"\x12" + bytes([len(info)]) + info
    assert w.encode_add("u1", "n", "ns", "sa") == b"\x0a" + bytes([len(add)]) + add
    # keep=5 { uid=1 }, del=2 { uid=2 } (DelWorkload's uid is field 2 on the wire)
    assert w.encode_keep("u1") == bytes.fromhex("2a04") + b"\x0a\x02u1"
    assert w.encode_del("u1") == bytes.fromhex("1204") + b"\x12\x02u1"
    assert w.encode_ack("bad") == bytes.fromhex("0a050a03") + b"bad"


def test_decoders_accept_good_and_reject_bad() -> None:
    assert w.decode_hello(bytes.fromhex("0801")) == pb.V1
    assert w.decode_ack(bytes.fromhex("0a00")) == ""
    assert w.decode_ack(w.encode_ack("no netns")) == "no netns"
    req = w.decode_request(w.encode_add("u", "n", "ns", "sa"))
    assert req.WhichOneof("payload") == "add" and req.add.workload_info.service_account == "sa"
    with pytest.raises(w.ZdsProtocolError, match="version"):
        w.decode_hello(b"")  # NOT_USED
    with pytest.raises(w.ZdsProtocolError, match="decode"):
        w.decode_ack(b"\xff\xff\xff\xff")
    with pytest.raises(w.ZdsProtocolError, match="expected an ack"):
        w.decode_ack(b"")
    with pytest.raises(w.ZdsProtocolError, match="without payload"):
        w.decode_request(b"")


def test_oversized_request_refused_before_sending() -> None:
    with pytest.raises(w.ZdsProtocolError, match="1024"):
        w.encode_add("u" * 2000, "n", "ns", "sa")


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    yield a, b
    a.close()
    b.close()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_fd_travels_with_its_packet(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    r, wr = os.pipe()
    try:
        zds_socket.send_packet(a, w.encode_add("u", "n", "ns", "sa"), r, timeout=1)
        pkt = zds_socket.recv_packet(b, timeout=1)
        assert len(pkt.fds) == 1
        # The received fd is the same open file (same inode) as the one sent.
        assert os.fstat(pkt.fds[0]).st_ino == os.fstat(r).st_ino
        assert not os.get_inheritable(pkt.fds[0])
        pkt.close_fds()
    finally:
        os.close(r)
        os.close(wr)


def test_truncated_packet_is_an_error_and_closes_fds(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    before = _fds()
    r, wr = os.pipe()
    a.sendmsg([b"x" * 2000], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, r.to_bytes(4, "little"))])
    os.close(r)
    os.close(wr)
    with pytest.raises(w.ZdsProtocolError, match="truncated"):
        zds_socket.recv_packet(b, timeout=1)
    assert _fds() == before


def test_eof_and_timeout(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    with pytest.raises(w.ZdsClosedError, match="deadline"):
        zds_socket.recv_packet(b, timeout=0.05)
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(w.ZdsClosedError, match="EOF"):
        zds_socket.recv_packet(b, timeout=1)
