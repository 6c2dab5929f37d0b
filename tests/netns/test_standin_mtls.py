"""Two pods with the iptables backend applied talk through both stand-in sides over mTLS.

Pod A's request to pod B's app is caught by A's rules (15001), carried as HBONE (TLS 1.3 with
both SPIFFE certificates, CONNECT) to B's 15008 and delivered to B's app. A capture on B's
veth shows only TLS to 15008, never the plaintext; the access log has both identities.
"""

from __future__ import annotations

import json
import signal
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from cni_plugin.netns import run_in_netns
from cni_plugin.redirection.registry import make_backend
from cni_plugin.redirection.settings import RedirectSettings
from node_agent.zds_server import WorkloadInfo, ZdsServer
from testbed.ztunnel_standin.identity import MeshCa, spiffe_id
from testbed.ztunnel_standin.topology import AppServer, Pod, TwoPods, client_socket, http_get
from tests.netns.test_standin_zds import StandinProcess
from tests.time_scale import scaled
from tests.unit.test_zds_server import ListSource, PathEntry, wait_for

pytestmark = pytest.mark.netns

MARKER = "PLAINTEXT-MARKER-7f3a9c"
SETTINGS = RedirectSettings(dns_capture=True, ipv6=False)  # what `mesh` applies


@contextmanager
def _mesh(tmp_path: Path, ipv6: bool) -> Iterator[tuple[TwoPods, StandinProcess, AppServer]]:
    pods = TwoPods(ipv6=ipv6)
    server = ZdsServer(
        str(tmp_path / "zt" / "ztunnel.sock"),
        ListSource(),
        accept_rate=1000,
        ack_timeout=scaled(5),
        hello_timeout=scaled(5),
    )
    backend = make_backend("iptables", applier="iptables-restore")
    settings = RedirectSettings(dns_capture=True, ipv6=ipv6)
    standin = StandinProcess(
        server.socket_path, tmp_path, "--dns-upstream", f"{pods.b.ip}:53",
        "--drain-seconds", str(DRAIN_S),
    )  # fmt: skip
    app = None
    try:
        for p in (pods.a, pods.b):
            backend.apply(p.path, settings)
        server.start()
        standin.start()
        assert wait_for(lambda: server.connected, 10), standin.log()
        server.add("uid-a", pods.a.path, WorkloadInfo("client", "ns-a", "client-sa"))
        server.add("uid-b", pods.b.path, WorkloadInfo("server", "ns-b", "server-sa"))
        app_ip = pods.b.ip6 if ipv6 and pods.b.ip6 else pods.b.ip
        app = AppServer(pods.b.path, app_ip, 8080, "b")
        _SERVERS[server.socket_path] = server
        yield pods, standin, app
    finally:
        _SERVERS.pop(server.socket_path, None)
        if app is not None:
            app.close()
        standin.stop()
        server.stop()
        pods.close()


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[tuple[TwoPods, StandinProcess, AppServer]]:
    with _mesh(tmp_path, ipv6=False) as m:
        yield m


def _capture(pod_name: str, dev: str, out: Path) -> subprocess.Popen[bytes]:
    # --immediate-mode: without it packets wait in the capture ring and a quick stop loses them.
    cmd = f"tcpdump -i {dev} --immediate-mode -U -n -s 0 -Z root -w {out} tcp or udp"
    proc = subprocess.Popen(["ip", "netns", "exec", pod_name, *cmd.split()], stderr=subprocess.PIPE)
    assert proc.stderr is not None
    line = proc.stderr.readline()  # "listening on ...": the capture is armed
    assert b"listening on" in line, line
    return proc


@contextmanager
def _captured(pod: Pod, out: Path) -> Iterator[None]:
    """Capture on ``pod``'s veth into ``out`` while the block runs; stopped (and flushed)
    on exit, even when the block fails."""
    cap = _capture(pod.name, pod.dev, out)
    try:
        yield
    finally:
        time.sleep(0.2)  # let the last packets reach the capture before stopping it
        cap.send_signal(signal.SIGINT)
        cap.wait(5)
        if cap.stderr is not None:
            cap.stderr.close()


@contextmanager
def _mesh_connection(pods: TwoPods, port: int) -> Iterator[tuple[socket.socket, socket.socket]]:
    """A TCP connection from pod A to a listener on pod B's ``port``, carried by the mesh
    (A's rules catch it): yields (A's client socket, B's accepted socket), both with a 5 s
    timeout; the accepted socket, the client and the listener are all closed on exit."""

    def listen() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind((pods.b.ip, port))
        s.listen(4)
        return s

    listener = run_in_netns(pods.b.path, listen)
    client = client_socket(pods.a.path)
    try:
        listener.settimeout(5)
        client.settimeout(5)
        client.connect((pods.b.ip, port))
        conn, _ = listener.accept()
        with conn:
            yield client, conn
    finally:
        client.close()
        listener.close()


def _round_trip(client: socket.socket, conn: socket.socket, request: bytes, answer: bytes) -> None:
    """``request`` from A's client arrives whole at B's socket, and ``answer`` comes back."""
    client.sendall(request)
    assert conn.recv(len(request)) == request
    conn.sendall(answer)
    assert client.recv(len(answer)) == answer


def _packets(pcap: Path) -> list[tuple[int, int, bytes]]:
    """(src port, dst port, transport payload) of every IPv4/IPv6 TCP/UDP packet in a pcap."""
    data = pcap.read_bytes()
    assert struct.unpack_from("<I", data)[0] == 0xA1B2C3D4  # microsecond pcap, LE
    assert struct.unpack_from("<I", data, 20)[0] == 1  # ethernet
    out, off = [], 24
    while off + 16 <= len(data):
        incl = struct.unpack_from("<I", data, off + 8)[0]
        frame = data[off + 16 : off + 16 + incl]
        off += 16 + incl
        if frame[12:14] == b"\x08\x00":  # IPv4
            proto, l4 = frame[23], frame[14 + (frame[14] & 0x0F) * 4 :]
        elif frame[12:14] == b"\x86\xdd":  # IPv6 (no extension headers here)
            proto, l4 = frame[20], frame[54:]
        else:
            continue
        if proto not in (6, 17) or len(l4) < 8:
            continue
        sport, dport = struct.unpack_from("!HH", l4)
        payload = l4[(l4[12] >> 4) * 4 :] if proto == 6 else l4[8:]
        out.append((sport, dport, payload))
    return out


def test_request_crosses_both_sides_as_mtls(
    mesh: tuple[TwoPods, StandinProcess, AppServer], tmp_path: Path
) -> None:
    pods, standin, _ = mesh
    pcap = tmp_path / "veth-b.pcap"
    with _captured(pods.b, pcap):
        reply = http_get(client_socket(pods.a.path), pods.b.ip, 8080, f"/{MARKER}")
    assert reply.startswith(b"HTTP/1.1 200 OK"), reply
    assert f"hello from b: GET /{MARKER}".encode() in reply

    packets = _packets(pcap)
    assert packets, "nothing captured on the veth"
    assert all(8080 not in (s, d) for s, d, _ in packets), "plaintext port seen on the wire"
    tls = [p for s, d, p in packets if d == 15008 and p]
    assert tls and all(MARKER.encode() not in p for _, _, p in packets)
    assert tls[0][:1] == b"\x16"  # a TLS handshake record opens the HBONE connection
    assert any(p[:3] == b"\x17\x03\x03" for p in tls)  # then application-data records

    # One access-log line per side, both naming both SPIFFE identities.
    a_id, b_id = spiffe_id("ns-a", "client-sa"), spiffe_id("ns-b", "server-sa")
    assert wait_for(lambda: len(_log_lines(standin)) >= 2), standin.log()
    lines = {ln["direction"]: ln for ln in _log_lines(standin)}
    out, inb = lines["outbound"], lines["inbound"]
    for ln in (out, inb):
        assert (ln["src.identity"], ln["dst.identity"]) == (a_id, b_id)
        assert ln["dst.hbone_addr"] == f"{pods.b.ip}:8080"
        assert int(str(ln["bytes_sent"])) > len(MARKER) < int(str(ln["bytes_recv"]))
        assert str(ln["duration"]).endswith("ms")
    assert (out["src.workload"], out["src.namespace"]) == ("client", "ns-a")
    assert (inb["dst.workload"], inb["dst.namespace"]) == ("server", "ns-b")
    assert out["dst.addr"] == f"{pods.b.ip}:15008"
    assert str(inb["src.addr"]).startswith(f"{pods.a.ip}:")


def _log_lines(standin: StandinProcess) -> list[dict[str, object]]:
    if not standin.access_log.exists():
        return []
    return [json.loads(x) for x in standin.access_log.read_text().splitlines() if x]


def test_inbound_plaintext_on_15006_reaches_the_app(
    mesh: tuple[TwoPods, StandinProcess, AppServer],
) -> None:
    pods, standin, _ = mesh
    # A marked socket leaves pod A uncaptured, so it arrives at B in plaintext: B's rules
    # send it to 15006 and the stand-in hands it to the app.
    reply = http_get(client_socket(pods.a.path, marked=True), pods.b.ip, 8080, "/plain")
    assert b"hello from b: GET /plain" in reply
    assert wait_for(
        lambda: any(
            ln["dst.hbone_addr"] is None and ln["direction"] == "inbound"
            for ln in _log_lines(standin)
        )
    )
    line = next(ln for ln in _log_lines(standin) if ln["direction"] == "inbound")
    assert line["src.identity"] is None and line["dst.addr"] == f"{pods.b.ip}:8080"


def test_dns_on_15053_is_forwarded_to_the_resolver(
    mesh: tuple[TwoPods, StandinProcess, AppServer],
) -> None:
    pods, _, _ = mesh

    # A "resolver" in pod B answering every query with its own bytes reversed.
    def resolver_sock() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((pods.b.ip, 53))
        return s

    resolver = run_in_netns(pods.b.path, resolver_sock)

    def client_sock() -> socket.socket:
        return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    client = run_in_netns(pods.a.path, client_sock)
    try:
        client.settimeout(5)
        resolver.settimeout(5)
        client.sendto(b"query-123", (pods.b.ip, 53))
        query, seen_from = resolver.recvfrom(512)
        assert query == b"query-123"
        # Forwarded by the stand-in from its own (marked) socket, not the client's.
        assert seen_from[1] != client.getsockname()[1]
        resolver.sendto(query[::-1], seen_from)
        answer, answered_from = client.recvfrom(512)
        assert answer == b"321-yreuq"
        assert answered_from == (pods.b.ip, 53)  # un-NATed: looks like the resolver replied
    finally:
        client.close()
        resolver.close()


def test_outbound_to_a_pod_outside_the_mesh_passes_through(
    mesh: tuple[TwoPods, StandinProcess, AppServer], tmp_path: Path
) -> None:
    pods, standin, _ = mesh
    # B leaves the mesh: no proxy, no rules. A's outbound is still caught, and sent as is.
    standin_agent_delete(mesh, "uid-b")
    make_backend("iptables", applier="iptables-restore").remove(pods.b.path, SETTINGS)
    pcap = tmp_path / "plain.pcap"
    with _captured(pods.b, pcap):
        reply = http_get(client_socket(pods.a.path), pods.b.ip, 8080, f"/{MARKER}")
    assert f"hello from b: GET /{MARKER}".encode() in reply
    assert any(MARKER.encode() in p for s, d, p in _packets(pcap) if d == 8080)
    assert wait_for(lambda: any(ln["direction"] == "outbound" for ln in _log_lines(standin)))
    line = next(ln for ln in _log_lines(standin) if ln["direction"] == "outbound")
    assert line["dst.addr"] == f"{pods.b.ip}:8080" and line["dst.hbone_addr"] is None
    assert line["src.identity"] == spiffe_id("ns-a", "client-sa") and line["dst.identity"] is None


def standin_agent_delete(mesh: tuple[TwoPods, StandinProcess, AppServer], uid: str) -> None:
    _SERVERS[mesh[1].sock].delete(uid)


_SERVERS: dict[str, ZdsServer] = {}  # the agent serving each stand-in (by socket path)


DRAIN_S = 1.0  # the stand-in's drain deadline here (ztunnel's default is 5 s)


def listeners_of(pod: Pod) -> set[int]:
    out = subprocess.run(["ip", "netns", "exec", pod.name, "ss", "-Hltn"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return {int(ln.split()[3].rsplit(":", 1)[1]) for ln in out.splitlines() if ln.strip()}


def test_del_drains_the_pods_open_connections_then_closes_them(
    mesh: tuple[TwoPods, StandinProcess, AppServer],
) -> None:
    pods, _, _ = mesh
    # Through 15001 -> HBONE -> 15008 -> app.
    with _mesh_connection(pods, 9090) as (client, conn):
        client.sendall(b"ping")
        assert conn.recv(4) == b"ping"
        deleted = time.monotonic()
        standin_agent_delete(mesh, "uid-a")
        # As ztunnel: the open connection may go on until the drain deadline ...
        client.sendall(b"pong")
        assert conn.recv(4) == b"pong"
        assert listeners_of(pods.a) & {15001, 15006, 15008} == set()  # ... nothing new
        try:
            got = client.recv(16)  # ... then A's proxy closes it: EOF ...
        except ConnectionResetError:
            got = b""  # ... or reset
        waited = time.monotonic() - deleted
        assert got == b"", "the connection outlived its pod's proxy"
        assert DRAIN_S * 0.8 <= waited < DRAIN_S + 3, waited


def test_dns_over_tcp_goes_to_the_resolver_the_pod_dialled(
    mesh: tuple[TwoPods, StandinProcess, AppServer],
) -> None:
    pods, _, _ = mesh
    # The resolver listens on B:53; A's rules send the connection to 15053 (TCP).
    with _mesh_connection(pods, 53) as (client, conn):
        _round_trip(client, conn, b"\x00\x05query", b"\x00\x06answer")


def test_failed_connection_still_gets_its_access_log_line(
    mesh: tuple[TwoPods, StandinProcess, AppServer],
) -> None:
    pods, standin, _ = mesh
    # Nothing listens on 8081 in B: B's side answers the CONNECT with 503, both sides log.
    reply = http_get(client_socket(pods.a.path), pods.b.ip, 8081, "/nobody")
    assert reply == b""
    assert wait_for(lambda: len(_log_lines(standin)) >= 2)
    lines = {str(ln["direction"]): ln for ln in _log_lines(standin)}
    assert "503" in str(lines["outbound"]["error"])
    assert f"connect {pods.b.ip}:8081" in str(lines["inbound"]["error"])
    assert lines["inbound"]["src.identity"] == spiffe_id("ns-a", "client-sa")


def test_ipv6_request_crosses_both_sides_as_mtls(tmp_path: Path) -> None:
    with _mesh(tmp_path, ipv6=True) as (pods, standin, _):
        assert pods.a.ip6 and pods.b.ip6
        pcap = tmp_path / "veth-b6.pcap"
        with _captured(pods.b, pcap):
            sock = client_socket(pods.a.path, ipv6=True)
            reply = http_get(sock, pods.b.ip6, 8080, f"/{MARKER}")
        assert f"hello from b: GET /{MARKER}".encode() in reply
        packets = _packets(pcap)
        assert any(d == 15008 and p[:1] == b"\x16" for _, d, p in packets)
        assert all(MARKER.encode() not in p for _, _, p in packets)
        assert wait_for(lambda: len(_log_lines(standin)) >= 2)
        out = next(ln for ln in _log_lines(standin) if ln["direction"] == "outbound")
        # The original destination came back through IP6T_SO_ORIGINAL_DST.
        assert out["dst.hbone_addr"] == f"[{pods.b.ip6}]:8080"
        assert out["dst.identity"] == spiffe_id("ns-b", "server-sa")


def _hbone_connect(pods: TwoPods, ctx: ssl.SSLContext) -> bytes:
    """CONNECT to B's app through B's 15008 from a marked (uncaptured) socket in A."""
    raw = client_socket(pods.a.path, marked=True)
    raw.settimeout(5)
    raw.connect((pods.b.ip, 15008))
    try:
        with ctx.wrap_socket(raw) as tls:
            tls.sendall(f"CONNECT {pods.b.ip}:8080 HTTP/1.1\r\n\r\n".encode())
            return tls.recv(64)
    except (ssl.SSLError, OSError) as e:
        return f"refused: {e}".encode()
    finally:
        raw.close()


def test_hbone_port_requires_a_mesh_certificate(
    mesh: tuple[TwoPods, StandinProcess, AppServer], tmp_path: Path
) -> None:
    pods, standin, _ = mesh
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.check_hostname = False
    anonymous.verify_mode = ssl.CERT_NONE
    assert not _hbone_connect(pods, anonymous).startswith(b"HTTP/1.1 200")

    # A certificate from the mesh CA for an identity outside these pods is accepted, and
    # that identity (read from the certificate) is what B's side logs.
    other = MeshCa(str(standin.workdir / "ca")).issue("outsider", "ns-x", "x-sa")
    assert _hbone_connect(pods, other.client).startswith(b"HTTP/1.1 200 OK")
    assert wait_for(lambda: any(ln["direction"] == "inbound" for ln in _log_lines(standin)))
    line = next(ln for ln in _log_lines(standin) if ln["direction"] == "inbound")
    assert line["src.identity"] == spiffe_id("ns-x", "x-sa")


def test_agent_restart_keeps_open_connections(
    mesh: tuple[TwoPods, StandinProcess, AppServer],
) -> None:
    pods, standin, _ = mesh
    server = _SERVERS[standin.sock]
    src = server.snapshot_source
    assert isinstance(src, ListSource)
    src.entries = [
        PathEntry("uid-a", WorkloadInfo("client", "ns-a", "client-sa"), pods.a.path),
        PathEntry("uid-b", WorkloadInfo("server", "ns-b", "server-sa"), pods.b.path),
    ]
    with _mesh_connection(pods, 9091) as (client, conn):
        client.sendall(b"before")
        assert conn.recv(6) == b"before"
        # The agent goes away and comes back: the stand-in reconnects, the snapshot's
        # Adds carry the same netns inodes, so they are no-ops and no proxy restarts.
        server.stop()
        server.start()
        assert wait_for(lambda: server.connected, 10)
        assert wait_for(lambda: standin.log().count("add for a known netns: no-op") >= 2)
        _round_trip(client, conn, b"after", b"back")


def test_direct_dial_of_the_proxy_port_is_refused_not_looped(
    mesh: tuple[TwoPods, StandinProcess, AppServer],
) -> None:
    pods, standin, _ = mesh
    # A marked socket is not redirected, so 15001 sees no NAT: the local-address fallback
    # names the proxy itself. It must be refused, not dialled again (a loop).
    sock = client_socket(pods.a.path, marked=True)
    try:
        reply = http_get(sock, pods.a.ip, 15001, "/loop")
    except ConnectionResetError:
        reply = b""  # closed with our request unread: a reset
    assert reply == b""
    assert wait_for(lambda: bool(_log_lines(standin)))
    (line,) = _log_lines(standin)
    assert "is the proxy itself" in str(line["error"])


def test_standin_sockets_carry_mark_1337_apps_do_not(
    mesh: tuple[TwoPods, StandinProcess, AppServer],
) -> None:
    pods, _, _ = mesh
    with _mesh_connection(pods, 9092):
        marks = _marks(pods.a.name)
        # In A: the app's socket to B:9092 is unmarked; the stand-in's HBONE leg to
        # B:15008 carries 0x539 so A's rules let it pass.
        assert marks[("tcp", f"{pods.b.ip}:9092")] == 0
        assert marks[("tcp", f"{pods.b.ip}:15008")] == 0x539
        # In B: the stand-in's leg to the app is marked too.
        assert _marks(pods.b.name)[("tcp", f"{pods.b.ip}:9092")] == 0x539


def _marks(netns_name: str) -> dict[tuple[str, str], int]:
    """(proto, peer) -> fwmark of the established sockets, from ``ss -tne`` in the netns
    (the highest mark when several sockets share a peer)."""
    out = subprocess.run(
        ["ip", "netns", "exec", netns_name, "ss", "-Htne", "state", "established"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    marks: dict[tuple[str, str], int] = {}
    for line in out.splitlines():
        cols = line.split()
        peer = cols[3].replace("[::ffff:", "").replace("]", "")
        mark = next((int(c.split(":")[1], 16) for c in cols if c.startswith("fwmark:")), 0)
        marks[("tcp", peer)] = max(mark, marks.get(("tcp", peer), 0))
    return marks
