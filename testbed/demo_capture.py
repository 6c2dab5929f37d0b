"""A packet capture on one veth of the testbed node, and what it says about the bytes.

Role: :class:`VethCapture` reads every frame crossing a node-side veth (an ``AF_PACKET``
socket made inside the node's network namespace, read on a thread of this process) while
the demo sends requests; :func:`summarise` reassembles the TCP streams between pods and
tells, for each, whether every byte of it is inside well-formed TLS records and whether
any plaintext marker (an HTTP request line, a known response body) appears in it.

Invariant: the socket is closed by :meth:`VethCapture.stop` (also on error); nothing is
sent, only read.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Any

from cni_plugin.netns import run_in_netns

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
PLAINTEXT_MARKERS = (b"GET /", b"HTTP/1.1 200", b"William Shakespeare", b"Reviewer1")
TLS_CONTENT_TYPES = {20: "change_cipher_spec", 21: "alert", 22: "handshake", 23: "application_data"}


@dataclass
class Flow:
    src: str
    sport: int
    dst: str
    dport: int
    segments: dict[int, bytes] = field(default_factory=dict)  # seq -> payload

    def stream(self) -> bytes:
        out, end = b"", None
        for seq in sorted(self.segments):
            data = self.segments[seq]
            if end is not None and seq < end:  # retransmission or overlap
                data = data[end - seq :]
            out += data
            end = max(end or 0, seq + len(self.segments[seq]))
        return out


class VethCapture:
    """Capture on ``ifname`` of the namespace at ``netns_path`` until :meth:`stop`."""

    def __init__(self, netns_path: str, ifname: str) -> None:
        self.ifname = ifname
        self.frames = 0
        self._flows: dict[tuple[str, int, str, int], Flow] = {}

        def make() -> socket.socket:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            try:
                s.bind((ifname, ETH_P_ALL))
            except OSError:
                s.close()
                raise
            return s

        self._sock = run_in_netns(netns_path, make)
        self._sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="capture", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                frame = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.frames += 1
            self._add(frame)

    def _add(self, frame: bytes) -> None:
        if len(frame) < 34 or struct.unpack("!H", frame[12:14])[0] != ETH_P_IP:
            return
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        total = struct.unpack("!H", ip[2:4])[0]
        if ip[9] != socket.IPPROTO_TCP or len(ip) < ihl + 20:
            return
        src, dst = socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])
        tcp = ip[ihl:total]
        sport, dport, seq = struct.unpack("!HHI", tcp[:8])
        payload = tcp[(tcp[12] >> 4) * 4 :]
        if payload:
            key = (src, sport, dst, dport)
            flow = self._flows.setdefault(key, Flow(src, sport, dst, dport))
            flow.segments.setdefault(seq, payload)

    def stop(self) -> list[Flow]:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()
        return list(self._flows.values())


def tls_records(stream: bytes) -> tuple[list[str], int]:
    """Walk ``stream`` as TLS records: (record types seen, bytes covered by whole or
    trailing-partial records). Stops at the first byte that cannot start a record."""
    kinds: list[str] = []
    pos = 0
    while pos + 5 <= len(stream):
        ctype, major = stream[pos], stream[pos + 1]
        length = struct.unpack("!H", stream[pos + 3 : pos + 5])[0]
        if ctype not in TLS_CONTENT_TYPES or major != 3 or length > 18432:
            break
        kinds.append(TLS_CONTENT_TYPES[ctype])
        pos = min(len(stream), pos + 5 + length)
    if pos + 5 > len(stream) and pos < len(stream) and kinds:
        pos = len(stream)  # a record header cut by the end of the capture
    return kinds, pos


def summarise(flows: list[Flow], pod_cidr: str, gateway: str) -> dict[str, Any]:
    """Facts about the TCP streams between two pod addresses (the node's gateway address,
    i.e. kubelet's probes, excluded)."""
    net = ipaddress.ip_network(pod_cidr)

    def pod_ip(a: str) -> bool:
        return ipaddress.ip_address(a) in net and a != gateway

    streams: list[dict[str, Any]] = []
    for f in flows:
        if not (pod_ip(f.src) and pod_ip(f.dst)):
            continue
        data = f.stream()
        kinds, covered = tls_records(data)
        streams.append(
            {
                "flow": f"{f.src}:{f.sport} -> {f.dst}:{f.dport}",
                "ports": sorted({f.sport, f.dport}),
                "bytes": len(data),
                "tls_bytes": covered,
                "all_tls": covered == len(data),
                "tls_records": sorted(set(kinds)),
                "plaintext_markers": [m.decode() for m in PLAINTEXT_MARKERS if m in data],
                "first_bytes": data[:8].hex(" "),
            }
        )
    return {
        "streams": streams,
        "bytes": sum(s["bytes"] for s in streams),
        "tls_bytes": sum(s["tls_bytes"] for s in streams),
        "plaintext_streams": sum(1 for s in streams if s["plaintext_markers"]),
        "ports": sorted({p for s in streams for p in s["ports"] if p < 32768}),
    }
