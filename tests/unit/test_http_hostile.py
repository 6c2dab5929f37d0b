"""The agent's HTTP servers against hostile and broken clients (issue 14.3), over their real
sockets: the plugin-event unix socket, health and metrics on 127.0.0.1. Every malformed
request gets a 4xx with one line; slow, idle and short-bodied clients are cut at the read
deadline; a flood of held connections cannot lock out a real ADD; nothing prints a
traceback."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from node_agent.health import HealthServer
from node_agent.metrics import AgentMetrics
from node_agent.plugin_events import PluginEventServer
from node_agent.pod_controller import PluginAdd
from tests.time_scale import scaled

READ_TIMEOUT = 0.5
CAP = 8
BODY = json.dumps(
    {"Netns": "/var/run/netns/cni-1", "PodName": "web-0", "PodNamespace": "shop", "IPs": []}
).encode()


def _unix(path: str) -> Callable[[], socket.socket]:
    def connect() -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(scaled(5))
        s.connect(path)
        return s

    return connect


def _tcp(port: int) -> Callable[[], socket.socket]:
    def connect() -> socket.socket:
        return socket.create_connection(("127.0.0.1", port), timeout=scaled(5))

    return connect


def _answer(s: socket.socket) -> tuple[int, str]:
    """Read one response (status, body); (0, "") when the server just closed."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            return 0, ""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(
        int(h.split(":", 1)[1]) for h in lines[1:] if h.lower().startswith("content-length")
    )
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), body.decode()


def _exchange(connect: Callable[[], socket.socket], raw: bytes) -> tuple[int, str]:
    s = connect()
    try:
        s.sendall(raw)
        return _answer(s)
    finally:
        s.close()


def _post(path: str, body: bytes, length: str | None = None) -> bytes:
    n = str(len(body)) if length is None else length
    return f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {n}\r\n\r\n".encode() + body


@pytest.fixture
def plugin_server(tmp_path: Path) -> Iterator[tuple[PluginEventServer, list[PluginAdd]]]:
    adds: list[PluginAdd] = []

    def on_add(ev: PluginAdd) -> str:
        adds.append(ev)
        return "enrolled"

    def status(ns: str, name: str) -> Mapping[str, Any]:
        return {"known": False}

    s = PluginEventServer(
        str(tmp_path / "pluginevent.sock"),
        on_add,
        status,
        log_socket_path=str(tmp_path / "log.sock"),
        read_timeout=READ_TIMEOUT,
        max_connections=CAP,
    )
    s.start()
    yield s, adds
    s.stop()


MALFORMED = {
    "content-length not a number": (_post("/cmdadd", BODY, "abc"), 400, "Content-Length"),
    "content-length negative": (_post("/cmdadd", BODY, "-5"), 400, "Content-Length"),
    "content-length missing": (
        b"POST /log HTTP/1.1\r\nHost: x\r\n\r\n[]",
        411,
        "Content-Length",
    ),
    "content-length huge": (_post("/cmdadd", b"", "99999999999"), 413, "limit"),
    "deeply nested json": (_post("/cmdadd", b"[" * 200_000), 400, "nested"),
    "deeply nested log": (_post("/log", b"[" * 200_000), 400, "JSON array"),
    "address not an ip": (
        _post(
            "/cmdadd",
            json.dumps(
                {
                    "Netns": "/x",
                    "PodName": "a",
                    "PodNamespace": "b",
                    "IPs": [{"Address": {"IP": "not-an-ip"}}],
                }
            ).encode(),
        ),
        400,
        "not an IP address",
    ),
    "not http": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n", 400, "bad"),
    "chunked": (
        b"POST /cmdadd HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        411,
        "Content-Length",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_requests_get_a_one_line_4xx(
    plugin_server: tuple[PluginEventServer, list[PluginAdd]],
    case: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    s, adds = plugin_server
    raw, code, needle = MALFORMED[case]
    got, text = _exchange(_unix(s.socket_path), raw)
    assert got == code and needle in text and "\n" not in text.strip(), (got, text)
    assert adds == []
    assert "Traceback" not in capsys.readouterr().err


def test_short_body_and_slow_headers_are_cut_at_the_deadline(
    plugin_server: tuple[PluginEventServer, list[PluginAdd]],
) -> None:
    s, adds = plugin_server
    connect = _unix(s.socket_path)
    short = connect()
    short.sendall(_post("/cmdadd", b'{"Netns":', length="500"))
    slow = connect()
    slow.sendall(b"POST /cmdadd HTTP/1.1\r\nHost: x\r\n")  # headers never finished
    idle = connect()  # says nothing at all
    t0 = time.monotonic()
    code, text = _answer(short)
    assert code == 408 and "shorter than its Content-Length" in text
    assert _answer(slow)[0] == 408 and _answer(idle) == (0, "")
    assert time.monotonic() - t0 < scaled(READ_TIMEOUT + 2)
    for c in (short, slow, idle):
        c.close()
    assert adds == []


def test_a_real_add_succeeds_while_many_hostile_connections_are_held(
    plugin_server: tuple[PluginEventServer, list[PluginAdd]],
) -> None:
    s, adds = plugin_server
    connect = _unix(s.socket_path)
    hostile = []
    for i in range(CAP * 4):  # idle, slow-header and short-body connections, all kept open
        c = connect()
        if i % 3 == 1:
            c.sendall(b"POST /cmdadd HTTP/1.1\r\n")
        elif i % 3 == 2:
            c.sendall(_post("/cmdadd", b"{", length="1000"))
        hostile.append(c)
    try:
        t0 = time.monotonic()
        assert _exchange(connect, _post("/cmdadd", BODY)) == (200, "enrolled")
        assert time.monotonic() - t0 < scaled(READ_TIMEOUT)  # not after the hostile ones left
        assert [a.pod_name for a in adds] == ["web-0"]
    finally:
        for c in hostile:
            c.close()


def test_health_and_metrics_survive_held_connections_and_answer_4xx() -> None:
    health = HealthServer(lambda: True, 0, "127.0.0.1")
    metrics = AgentMetrics()
    hport = health.start()
    mport = metrics.serve(0, "127.0.0.1")
    try:
        for port, url, want in ((hport, "/readyz", "ready"), (mport, "/metrics", "ztunnel")):
            connect = _tcp(port)
            held = [connect() for _ in range(80)]  # over the default cap of 64
            for c in held[::2]:
                c.sendall(b"GET /readyz HTTP/1.1\r\n")  # never finishes its headers
            try:
                code, text = _exchange(connect, f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                assert code == 200 and want in text
                code, text = _exchange(connect, b"NOT HTTP AT ALL\r\n\r\n")
                assert 400 <= code < 500 and "\n" not in text.strip()
            finally:
                for c in held:
                    c.close()
    finally:
        health.stop()
        metrics.stop()


@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_shutdown_wakes_the_serving_loop_instead_of_waiting_for_its_poll(
    family: str, tmp_path: Path
) -> None:
    """The agent stops four of these servers at every stop (restart to ready waits for it):
    ``shutdown`` wakes ``serve_forever``'s select at once. Served here with a 60 s poll, so
    a shutdown that waited for the poll would take a minute."""
    import threading

    from node_agent.http_serving import BoundedHandler, BoundedHTTPServer, BoundedUnixHTTPServer

    server: Any
    if family == "tcp":
        server = BoundedHTTPServer(("127.0.0.1", 0), BoundedHandler)
    else:
        server = BoundedUnixHTTPServer(str(tmp_path / "s.sock"), BoundedHandler)
    loop = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 60})
    loop.start()
    t0 = time.monotonic()
    server.shutdown()
    took = time.monotonic() - t0
    server.server_close()
    loop.join(timeout=scaled(5))
    assert not loop.is_alive() and took < scaled(5), took
