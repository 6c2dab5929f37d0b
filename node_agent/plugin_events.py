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
Sockets are unlinked and re-created on start, mode 0600, removed on stop. Served with read
deadlines and a connection cap (:mod:`node_agent.http_serving`): every malformed request
gets a 4xx with one line saying why.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import logging
import os
import threading
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cni_plugin.errors import ConfigError, IstioCniError
from node_agent.add_admission import AdmissionRefused
from node_agent.http_serving import (
    MAX_CONNECTIONS,
    READ_TIMEOUT,
    BadRequest,
    BoundedHandler,
    BoundedUnixHTTPServer,
)
from node_agent.pod_controller import PluginAdd

log = logging.getLogger("node_agent.plugin_events")
plugin_log = logging.getLogger("node_agent.plugin")

MAX_BODY = 1 << 20


def parse_cmdadd(body: bytes) -> PluginAdd:
    """Validate a ``/cmdadd`` body; :class:`BadRequest` names the first problem."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"body is not JSON: {e}") from None
    except RecursionError:
        raise BadRequest("body is not JSON this agent reads: nested too deeply") from None
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


class PluginEventServer:
    def __init__(
        self,
        socket_path: str,
        on_add: Callable[[PluginAdd], str],
        pod_status: Callable[[str, str], Mapping[str, Any]],
        on_request: Callable[[int], None] = lambda code: None,
        log_socket_path: str | None = None,
        *,
        read_timeout: float = READ_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.socket_path = socket_path
        self.log_socket_path = log_socket_path
        self.read_timeout = read_timeout
        self.max_connections = max_connections
        self._servers: list[tuple[str, BoundedUnixHTTPServer]] = []
        self.on_add = on_add
        self.pod_status = pod_status
        self.on_request = on_request

    def start(self) -> None:
        os.makedirs(os.path.dirname(self.socket_path) or ".", exist_ok=True)
        outer = self

        class Handler(BoundedHandler):
            max_body = MAX_BODY

            def _reply(self, code: int, text: str, ctype: str = "text/plain") -> None:
                self.reply(code, text, ctype)
                outer.on_request(code)

            def send_error(
                self, code: int, message: str | None = None, explain: str | None = None
            ) -> None:
                super().send_error(code, message, explain)
                outer.on_request(code)

            def do_POST(self) -> None:
                path = urlsplit(self.path).path
                try:
                    body = self.read_body()
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
                    self._reply(e.code, f"bad request: {e}")
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
                self.request_read()
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
                    server = BoundedUnixHTTPServer(
                        path,
                        Handler,
                        read_timeout=self.read_timeout,
                        max_connections=self.max_connections,
                    )
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
        except (ValueError, RecursionError):
            raise BadRequest("log body must be a JSON array of strings") from None
        if not isinstance(lines, list):
            raise BadRequest("log body must be a JSON array of strings")
        for line in lines:
            try:
                rec = json.loads(line) if isinstance(line, str) else line
            except (ValueError, RecursionError):
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
