"""The plugin-event server: HTTP over the unix socket ``<run_dir>/pluginevent.sock``.

Endpoints (the CNI plugin is the client; SPEC §3):
- ``POST /cmdadd`` with the JSON body ``{"Netns": str, "PodName": str, "PodNamespace": str,
  "IPs": [{"Interface": int|null, "Address": {"IP": str, "Mask": base64}, "Gateway": str}]}``.
  The pod is enrolled *before* the reply: 200 = enrolled (or not an ambient pod, body says
  which); 500 with a one-line message = enrollment failed (the plugin fails the ADD, the
  runtime retries); 400 with a message = malformed body, or refused: the namespace or IPs
  are not the named pod's, or the pod is not this node's (:mod:`node_agent.add_admission`;
  nothing is enrolled).
- ``POST /log``: the plugin's log lines (a JSON array of strings, each a JSON object with
  ``level``, ``time``, ``msg``), re-emitted in the agent's log; 200. Served on
  ``pluginevent.sock`` and on ``<run_dir>/log.sock`` (where the plugin sends its logs,
  SPEC §3) alike.
- ``GET /pod?ns=<namespace>&name=<name>`` (extension, lets the plugin skip an API call):
  200 with ``{"known": bool, "ambient": bool, "reason": str, "uid"?: str, "state"?: str}``
  from the agent's informer caches; ``known`` false when the agent has not seen the pod.
Sockets are unlinked and re-created on start, mode 0600, removed on stop.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import logging
import os
import socketserver
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cni_plugin.errors import ConfigError, IstioCniError
from node_agent.add_admission import AdmissionRefused
from node_agent.pod_controller import PluginAdd

log = logging.getLogger("node_agent.plugin_events")
plugin_log = logging.getLogger("node_agent.plugin")

MAX_BODY = 1 << 20


class BadRequest(ValueError):
    pass


def parse_cmdadd(body: bytes) -> PluginAdd:
    """Validate a ``/cmdadd`` body; :class:`BadRequest` names the first problem."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"body is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise BadRequest("body must be a JSON object with Netns, PodName, PodNamespace, IPs")
    for key in ("Netns", "PodName", "PodNamespace"):
        if not isinstance(doc.get(key), str) or not doc[key]:
            raise BadRequest(f"field {key!r} must be a non-empty string")
    raw_ips = doc.get("IPs")
    if raw_ips is None:
        raw_ips = []
    if not isinstance(raw_ips, list):
        raise BadRequest("field 'IPs' must be a list")
    ips: list[str] = []
    for i, item in enumerate(raw_ips):
        addr = item.get("Address") if isinstance(item, dict) else None
        if not isinstance(addr, dict) or not isinstance(addr.get("IP"), str):
            raise BadRequest(f"IPs[{i}].Address.IP must be a string")
        try:
            ipaddress.ip_address(addr["IP"])
        except ValueError:
            raise BadRequest(
                f"IPs[{i}].Address.IP {addr['IP'][:64]!r} is not an IP address"
            ) from None
        mask = addr.get("Mask")
        if mask is not None:
            try:
                base64.b64decode(mask, validate=True)
            except (ValueError, TypeError):
                raise BadRequest(f"IPs[{i}].Address.Mask must be base64") from None
        ips.append(addr["IP"])
    return PluginAdd(doc["Netns"], doc["PodName"], doc["PodNamespace"], tuple(ips))


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False


class PluginEventServer:
    def __init__(
        self,
        socket_path: str,
        on_add: Callable[[PluginAdd], str],
        pod_status: Callable[[str, str], Mapping[str, Any]],
        on_request: Callable[[int], None] = lambda code: None,
        log_socket_path: str | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.log_socket_path = log_socket_path
        self._servers: list[tuple[str, _UnixHTTPServer]] = []
        self.on_add = on_add
        self.pod_status = pod_status
        self.on_request = on_request

    def start(self) -> None:
        os.makedirs(os.path.dirname(self.socket_path) or ".", exist_ok=True)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("plugin request", extra={"fields": {"line": format % args}})

            def _reply(self, code: int, text: str, ctype: str = "text/plain") -> None:
                data = text.encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                outer.on_request(code)

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                if n > MAX_BODY:
                    raise BadRequest("body too large")
                return self.rfile.read(n) if n > 0 else b""

            def do_POST(self) -> None:
                path = urlsplit(self.path).path
                try:
                    body = self._body()
                    if path == "/cmdadd":
                        event = parse_cmdadd(body)
                    elif path == "/log":
                        outer._log(body)
                        self._reply(200, "ok")
                        return
                    else:
                        self._reply(404, f"unknown path {path}: use /cmdadd or /log")
                        return
                except BadRequest as e:
                    self._reply(400, f"bad request: {e}")
                    return
                try:
                    msg = outer.on_add(event)
                except AdmissionRefused as e:
                    self._reply(400, f"refused: {e}")
                    return
                except IstioCniError as e:
                    self._reply(
                        500, f"enrolling pod {event.pod_namespace}/{event.pod_name} failed: {e}"
                    )
                    return
                except Exception as e:  # never leave the plugin hanging on a bug
                    log.exception("cmdadd crashed")
                    self._reply(
                        500, f"agent error enrolling {event.pod_namespace}/{event.pod_name}: {e}"
                    )
                    return
                self._reply(200, msg)

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                if parts.path != "/pod":
                    self._reply(404, f"unknown path {parts.path}: use /pod?ns=..&name=..")
                    return
                q = parse_qs(parts.query)
                ns, name = q.get("ns", [""])[0], q.get("name", [""])[0]
                if not ns or not name:
                    self._reply(400, "bad request: give ns and name query parameters")
                    return
                self._reply(200, json.dumps(outer.pod_status(ns, name)), "application/json")

        paths = [self.socket_path] + ([self.log_socket_path] if self.log_socket_path else [])
        try:
            for path in paths:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                try:
                    server = _UnixHTTPServer(path, Handler)
                except OSError as e:
                    raise ConfigError(
                        f"cannot listen on {path}: {e.strerror}; check the run dir mount"
                    ) from None
                os.chmod(path, 0o600)
                self._servers.append((path, server))
                threading.Thread(
                    target=server.serve_forever, name=f"plugin-events:{os.path.basename(path)}",
                    daemon=True,
                ).start()  # fmt: skip
        except BaseException:
            self.stop()
            raise
        log.info("plugin event server listening", extra={"fields": {"sockets": paths}})

    def _log(self, body: bytes) -> None:
        try:
            lines = json.loads(body or b"[]")
        except ValueError:
            raise BadRequest("log body must be a JSON array of strings") from None
        if not isinstance(lines, list):
            raise BadRequest("log body must be a JSON array of strings")
        for line in lines:
            try:
                rec = json.loads(line) if isinstance(line, str) else line
            except ValueError:
                rec = {"msg": line}
            if not isinstance(rec, dict):
                rec = {"msg": str(rec)}
            level = getattr(logging, str(rec.get("level", "info")).upper(), logging.INFO)
            plugin_log.log(
                level if isinstance(level, int) else logging.INFO,
                str(rec.get("msg", "")),
                extra={"fields": {k: v for k, v in rec.items() if k not in ("msg", "level")}},
            )

    def stop(self) -> None:
        servers, self._servers = self._servers, []
        for path, server in servers:
            server.shutdown()
            server.server_close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
