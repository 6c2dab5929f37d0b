"""Crafted Ethernet frames (IPv4/IPv6, TCP/UDP, correct checksums) and their parsing, for
running the tc programs through ``BPF_PROG_TEST_RUN``."""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

SYN, ACK = 0x02, 0x10
ETH = 14


def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = int(sum(struct.unpack(f"!{len(data) // 2}H", data)))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def _csum(data: bytes) -> int:
    return ~_sum16(data) & 0xFFFF


def _pseudo(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    if len(src) == 4:
        return src + dst + struct.pack("!BBH", 0, proto, length)
    return src + dst + struct.pack("!IxxxB", length, proto)


def frame(
    src: str, dst: str, sport: int, dport: int, proto: str = "tcp", flags: int = SYN
) -> bytes:
    """An Ethernet frame from ``src:sport`` to ``dst:dport`` with valid checksums."""
    s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    pnum = socket.IPPROTO_TCP if proto == "tcp" else socket.IPPROTO_UDP
    payload = b"hello"
    if proto == "tcp":
        l4 = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0) + payload
        off = 16
    else:
        l4 = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
        off = 6
    c = _csum(_pseudo(s, d, pnum, len(l4)) + l4)
    if proto == "udp" and c == 0:
        c = 0xFFFF
    l4 = l4[:off] + struct.pack("!H", c) + l4[off + 2 :]
    if len(s) == 4:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0, 64, pnum, 0, s, d)
        ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
        ethertype = 0x0800
    else:
        ip = struct.pack("!IHBB16s16s", 6 << 28, len(l4), pnum, 64, s, d)
        ethertype = 0x86DD
    eth = bytes.fromhex("020000000002") + bytes.fromhex("020000000001")
    return eth + struct.pack("!H", ethertype) + ip + l4


@dataclass(frozen=True)
class Parsed:
    dst_mac: bytes
    src: str
    dst: str
    sport: int
    dport: int
    l3_ok: bool  # IPv4 header checksum (always True for IPv6)
    l4_ok: bool  # TCP/UDP checksum over the pseudo header


def parse(data: bytes) -> Parsed:
    ethertype = struct.unpack_from("!H", data, 12)[0]
    if ethertype == 0x0800:
        ihl = (data[ETH] & 0x0F) * 4
        ip = data[ETH : ETH + ihl]
        pnum, s, d = ip[9], ip[12:16], ip[16:20]
        l4 = data[ETH + ihl : ETH + struct.unpack_from("!H", ip, 2)[0]]
        l3_ok = _sum16(ip) == 0xFFFF
    else:
        ip = data[ETH : ETH + 40]
        pnum, s, d = ip[6], ip[8:24], ip[24:40]
        l4 = data[ETH + 40 : ETH + 40 + struct.unpack_from("!H", ip, 4)[0]]
        l3_ok = True
    sport, dport = struct.unpack_from("!HH", l4)
    l4_ok = _sum16(_pseudo(s, d, pnum, len(l4)) + l4) == 0xFFFF
    return Parsed(
        data[:6],
        str(ipaddress.ip_address(s)),
        str(ipaddress.ip_address(d)),
        sport,
        dport,
        l3_ok,
        l4_ok,
    )


SKB_CTX_SIZE = 192  # sizeof(struct __sk_buff) on 6.x
MARK_OFF, IFINDEX_OFF = 8, 40


def skb_ctx(mark: int = 0, ifindex: int = 0) -> bytes:
    ctx = bytearray(SKB_CTX_SIZE)
    struct.pack_into("<I", ctx, MARK_OFF, mark)
    struct.pack_into("<I", ctx, IFINDEX_OFF, ifindex)
    return bytes(ctx)


def ctx_mark(ctx: bytes) -> int:
    return int(struct.unpack_from("<I", ctx, MARK_OFF)[0])
