"""HTTP serving that a broken or hostile client can neither exhaust nor wedge (issue 14.3).

The agent's four HTTP endpoints (``pluginevent.sock``, ``log.sock``, health ``:8000``,
metrics ``:15014``) are served by :class:`BoundedUnixHTTPServer` / :class:`BoundedHTTPServer`
with handlers derived from :class:`BoundedHandler`. Invariants:

- **Read deadline.** A connection must deliver each request (line, headers and body) within
  ``read_timeout`` seconds of being accepted or of its previous reply; an idle keep-alive
  connection gets the same. One watchdog thread per server enforces it by shutting the
  socket's read side: the handler sees EOF, answers 408 with one line if it had started a
  request, and its thread ends. Handling time (e.g. an ADD waiting for ztunnel) is not
  counted: the handler disarms the deadline once its request is read.
- **Connection cap.** At most ``max_connections`` at once. When full, the connection that
  has been *reading* longest is cut (a flood of idle or slow connections cannot lock out a
  real client, who sends its request at once); if every connection is being handled, the
  newcomer gets a one-line 503 and is closed.
- **Every malformed request gets a 4xx with a one-line reason** (``text/plain``), never a
  traceback: a bad request line, bad or missing ``Content-Length``, a body shorter than
  announced, too large, or unparsable (the endpoint's own :class:`BadRequest`).
- A handler bug is logged in one line and answered 500, the server carries on.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

log = logging.getLogger("node_agent.http")

READ_TIMEOUT = 10.0  # seconds to send a whole request (the plugin sends it at once)
MAX_CONNECTIONS = 64


class BadRequest(ValueError):
    """A request the server refuses; ``code`` is its 4xx status, the text its one-line reason."""

    def __init__(self, reason: str, code: int = 400) -> None:
        super().__init__(reason)
        self.code = code


class _Watchdog:
    """The server's open connections and their read deadlines (None: being handled)."""

    def __init__(self, read_timeout: float, max_connections: int) -> None:
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        self._lock = threading.Lock()
        self._conns: dict[socket.socket, float | None] = {}
        self._was_cut: set[socket.socket] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="http-deadlines", daemon=True)
        self.cut = 0  # connections cut for missing their deadline or evicted at the cap

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def admit(self, sock: socket.socket) -> bool:
        """Track a new connection (armed); False when full of connections being handled."""
        with self._lock:
            if len(self._conns) >= self.max_connections:
                reading = [(d, s) for s, d in self._conns.items() if d is not None]
                if not reading:
                    return False
                _, oldest = min(reading, key=lambda t: t[0])
                self._conns[oldest] = None  # its handler sees EOF and ends
                self._cut(oldest)
            self._conns[sock] = time.monotonic() + self.read_timeout
            return True

    def arm(self, sock: socket.socket) -> None:
        with self._lock:
            if sock in self._conns:
                self._conns[sock] = time.monotonic() + self.read_timeout

    def disarm(self, sock: socket.socket) -> None:
        with self._lock:
            if sock in self._conns:
                self._conns[sock] = None

    def forget(self, sock: socket.socket) -> None:
        with self._lock:
            self._conns.pop(sock, None)
            self._was_cut.discard(sock)

    def was_cut(self, sock: socket.socket) -> bool:
        with self._lock:
            return sock in self._was_cut

    def _cut(self, sock: socket.socket) -> None:
        self.cut += 1
        self._was_cut.add(sock)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RD)

    def _run(self) -> None:
        tick = max(0.01, min(0.25, self.read_timeout / 4))
        while not self._stop.wait(tick):
            now = time.monotonic()
            with self._lock:
                late = [s for s, d in self._conns.items() if d is not None and d <= now]
                for s in late:
                    self._conns[s] = None
                    self._cut(s)


class _BoundedMixin(socketserver.ThreadingMixIn):
    daemon_threads = True
    block_on_close = False
    # A burst of connects waits in the backlog for accept instead of failing (a unix socket
    # refuses a connect with EAGAIN once its backlog is full, even the real plugin's).
    request_queue_size = 1024
    watchdog: _Watchdog

    def setup_bounds(self, read_timeout: float, max_connections: int) -> None:
        self.watchdog = _Watchdog(read_timeout, max_connections)
        self.watchdog.start()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.watchdog.admit(request):
            _refuse_busy(request)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self.watchdog.forget(request)
        super().shutdown_request(request)  # type: ignore[misc]

    def shutdown(self) -> None:
        """Stop ``serve_forever`` now, not at its next poll (0.5 s, per server, at every
        agent stop): the base sets its stop flag and waits; shutting the listening socket
        down makes the loop's select return at once (Linux wakes a poll on a listening
        socket that is shut down, TCP and unix alike), so it sees the flag."""
        stopper = threading.Thread(target=super().shutdown, name="http-shutdown")  # type: ignore[misc]
        stopper.start()
        with contextlib.suppress(OSError):
            self.socket.shutdown(socket.SHUT_RDWR)  # type: ignore[attr-defined]
        stopper.join()

    def server_close(self) -> None:
        super().server_close()
        self.watchdog.stop()

    def handle_error(self, request: Any, client_address: Any) -> None:
        e = sys.exc_info()[1]
        log.error("http handler failed", extra={"fields": {"error": f"{type(e).__name__}: {e}"}})


def _refuse_busy(sock: socket.socket) -> None:
    body = b"too many connections: retry shortly\n"
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with contextlib.suppress(OSError):
        sock.setblocking(False)  # a fresh socket's send buffer is empty: never blocks
        sock.send(head + body)


class BoundedUnixHTTPServer(_BoundedMixin, socketserver.UnixStreamServer):
    allow_reuse_address = False

    def __init__(
        self,
        path: str,
        handler: type[BaseHTTPRequestHandler],
        *,
        read_timeout: float = READ_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        super().__init__(path, handler)
        self.setup_bounds(read_timeout, max_connections)


class BoundedHTTPServer(_BoundedMixin, HTTPServer):
    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        *,
        read_timeout: float = READ_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)
        self.setup_bounds(read_timeout, max_connections)


class BoundedHandler(BaseHTTPRequestHandler):
    """A handler for the bounded servers: one-line errors, strict bodies, read deadline."""

    server: _BoundedMixin  # type: ignore[assignment]
    protocol_version = "HTTP/1.1"
    max_body = 1 << 20

    def handle_one_request(self) -> None:
        self.server.watchdog.arm(self.connection)
        try:
            super().handle_one_request()
        except BadRequest as e:  # from a do_* that leaves them to us
            with contextlib.suppress(OSError):
                self.send_error(e.code, str(e))
        except (ConnectionError, TimeoutError):
            self.close_connection = True  # the peer went away, or was cut mid-reply
        finally:
            self.server.watchdog.disarm(self.connection)

    def request_read(self) -> None:
        """Call once the whole request is read: handling time is not under the deadline."""
        self._not_cut()
        self.server.watchdog.disarm(self.connection)

    def _not_cut(self) -> None:
        if self.server.watchdog.was_cut(self.connection):
            self.close_connection = True
            raise BadRequest(
                f"request not received within {self.server.watchdog.read_timeout:g}s", 408
            )

    def read_body(self) -> bytes:
        """The body, exactly ``Content-Length`` bytes; :class:`BadRequest` otherwise."""
        keep = self.close_connection
        self.close_connection = True  # until the body is read whole: nothing left unread
        self._not_cut()
        raw = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding"):
            raise BadRequest("Transfer-Encoding is not supported: send a Content-Length", 411)
        if raw is None:
            # Without one the body would be read as the next request on this connection.
            raise BadRequest(f"a {self.command} needs a Content-Length header", 411)
        if raw.strip().isdigit() and len(raw.strip()) <= 12:
            n = int(raw.strip())
        else:
            raise BadRequest(f"Content-Length {raw[:32]!r} is not a byte count")
        if n > self.max_body:
            raise BadRequest(f"body of {n} bytes is over the {self.max_body} byte limit", 413)
        data = self.rfile.read(n) if n else b""
        if len(data) < n:
            self.close_connection = True
            raise BadRequest(
                f"body shorter than its Content-Length ({len(data)} of {n} bytes) within "
                f"{self.server.watchdog.read_timeout:g}s",
                408,
            )
        self.request_read()
        self.close_connection = keep
        return data

    def reply(self, code: int, text: str, ctype: str = "text/plain") -> None:
        data = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # The base class answers HTML over several lines; ours is one line of text.
        self.close_connection = True
        if self.request_version == "HTTP/0.9":
            self.request_version = "HTTP/1.0"  # else the base class sends no status line
        reason = " ".join((message or self.responses.get(code, ("error",))[0]).split())
        with contextlib.suppress(OSError):
            self.reply(code, f"bad request: {reason}" if 400 <= code < 500 else reason)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http request", extra={"fields": {"line": format % args}})
