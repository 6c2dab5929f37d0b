"""Health endpoints on ``:8000``: ``/healthz`` always 200 (the process serves), ``/readyz``
200 only once the agent is installed and watching (``ready()`` says so), else 503. Served
with read deadlines and a connection cap (:mod:`node_agent.http_serving`)."""

from __future__ import annotations

import threading
from collections.abc import Callable

from node_agent.http_serving import BoundedHandler, BoundedHTTPServer


class HealthServer:
    def __init__(self, ready: Callable[[], bool], port: int, addr: str = "0.0.0.0") -> None:
        self.ready = ready
        self.port = port
        self.addr = addr
        self._server: BoundedHTTPServer | None = None

    def start(self) -> int:
        outer = self

        class Handler(BoundedHandler):
            def do_GET(self) -> None:
                self.request_read()
                if self.path == "/healthz":
                    code, text = 200, "ok"
                elif self.path == "/readyz":
                    ok = outer.ready()
                    code, text = (200, "ready") if ok else (503, "not ready")
                else:
                    code, text = 404, "use /healthz or /readyz"
                self.reply(code, text)

        server = BoundedHTTPServer((self.addr, self.port), Handler)
        self._server = server
        threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
        return int(server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
