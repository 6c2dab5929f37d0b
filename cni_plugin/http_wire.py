"""A minimal HTTP/1.1 exchange over an already connected socket (stdlib only).

The plugin makes at most three small requests per run (agent, API server, log socket).
``http.client`` costs ~20 ms of imports (it pulls in ``email``), more than the whole
non-ambient path, so this module speaks just enough HTTP: one request with
``Connection: close``, a response framed by ``Content-Length``, chunked encoding, or EOF.
The caller owns the socket and its timeout.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # nothing at run time: ``socket`` alone imports ``enum`` and ``selectors``
    from collections.abc import Mapping
    from typing import Protocol

    class Connection(Protocol):
        """A connected stream socket: a plain or unix ``socket``, an ``ssl`` socket."""

        def sendall(self, data: bytes, /) -> None: ...
        def recv(self, bufsize: int, /) -> bytes: ...


_MAX_RESPONSE = 4 << 20  # a pod and a namespace are far smaller; refuse runaway peers


class HttpError(Exception):
    """The peer did not speak HTTP/1.x or closed the connection early."""


def exchange(
    sock: Connection,
    method: str,
    path: str,
    *,
    host: str,
    body: bytes = b"",
    headers: Mapping[str, str] | None = None,
) -> tuple[int, bytes]:
    """Send one request, return (status code, body)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close"]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    for key, value in (headers or {}).items():
        lines.append(f"{key}: {value}")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
    return _read_response(sock)


def _read_response(sock: Connection) -> tuple[int, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise HttpError("connection closed before the response headers")
        buf += chunk
        if len(buf) > _MAX_RESPONSE:
            raise HttpError("response headers too large")
    head, _, rest = buf.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise HttpError(f"not an HTTP response: {status_line[:80]!r}")
    status = int(parts[1])
    fields: dict[str, str] = {}
    for line in header_lines:
        key, _, value = line.partition(":")
        fields[key.strip().lower()] = value.strip()
    if fields.get("transfer-encoding", "").lower() == "chunked":
        return status, _dechunk(sock, rest)
    length = fields.get("content-length")
    if length is not None and length.isdigit():
        want = int(length)
        if want > _MAX_RESPONSE:
            raise HttpError("response body too large")
        while len(rest) < want:
            chunk = sock.recv(65536)
            if not chunk:
                raise HttpError("connection closed in the middle of the response body")
            rest += chunk
        return status, rest[:want]
    while True:  # no framing: the body runs to EOF (we asked for Connection: close)
        chunk = sock.recv(65536)
        if not chunk:
            return status, rest
        rest += chunk
        if len(rest) > _MAX_RESPONSE:
            raise HttpError("response body too large")


def _dechunk(sock: Connection, buf: bytes) -> bytes:
    out = b""
    while True:
        while b"\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise HttpError("connection closed inside a chunked body")
            buf += chunk
        size_line, _, buf = buf.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0].strip(), 16)
        except ValueError:
            raise HttpError(f"bad chunk size {size_line[:20]!r}") from None
        if size == 0:
            return out
        while len(buf) < size + 2:
            chunk = sock.recv(65536)
            if not chunk:
                raise HttpError("connection closed inside a chunk")
            buf += chunk
        out += buf[:size]
        buf = buf[size + 2 :]
        if len(out) > _MAX_RESPONSE:
            raise HttpError("response body too large")
