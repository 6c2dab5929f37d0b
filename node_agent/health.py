"""Health endpoints on ``:8000``: ``/healthz`` always 200 (the process serves), ``/readyz``
200 only once the agent is installed and watching (``ready()`` says so), else 503."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class HealthServer:
    def __init__(self, ready: Callable[[], bool], port: int, addr: str = "0.0.0.0") -> None:
        self.ready = ready
        self.port = port
        self.addr = addr
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> int:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass  # probes every few seconds: not worth a log line

            def do_GET(self) -> None:
                if self.path == "/healthz":
                    code, text = 200, "ok"
                elif self.path == "/readyz":
                    ok = outer.ready()
                    code, text = (200, "ready") if ok else (503, "not ready")
                else:
                    code, text = 404, "use /healthz or /readyz"
                data = text.encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        server = ThreadingHTTPServer((self.addr, self.port), Handler)
        server.daemon_threads = True
        self._server = server
        threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
        return int(server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
