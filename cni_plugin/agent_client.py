"""The plugin's side of the plugin -> node agent socket (SPEC §3), stdlib only.

``POST http://unix/cmdadd`` on ``<run_dir>/pluginevent.sock`` with the exact JSON keys of
Istio's ``CNIPluginAddEvent`` (``Netns``, ``PodName``, ``PodNamespace``, ``IPs``); a 200
means the pod is enrolled (rules in place, ztunnel acked). Logs go to ``log.sock`` the same
way, best effort. Errors are split by what the caller does with them: unreachable (nobody
is listening) versus answered-but-failed.
"""

from __future__ import annotations

import _socket  # ``socket`` would import ``enum`` and ``selectors``: ms per pod sandbox
import binascii
import os
import time

from cni_plugin import http_wire, json_codec
from cni_plugin.constants import PLUGIN_EVENT_SOCKET, PLUGIN_LOG_SOCKET

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: ``typing`` imports ``re``
    from collections.abc import Mapping, Sequence
    from typing import Any

AGENT_TIMEOUT_S = 5.0
QUERY_TIMEOUT_S = 5.0  # a busy agent is still the better judge than an API round trip
LOG_TIMEOUT_S = 0.2  # logging must never hold up a pod sandbox


class AgentUnreachableError(Exception):
    """No agent answered on the socket (missing, refused, or timed out)."""


class AgentFailedError(Exception):
    """The agent answered with a non-200 status; ``body`` is its explanation."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


def _mask_b64(prefix: int, bits: int) -> str:
    mask = ((1 << bits) - 1) ^ ((1 << (bits - prefix)) - 1)
    return binascii.b2a_base64(mask.to_bytes(bits // 8, "big"), newline=False).decode()


def ip_configs(prev_result: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """prevResult ``ips`` in the shape Go's ``[]IPConfig`` marshals to (net.IPNet, net.IP)."""
    out: list[dict[str, Any]] = []
    for ip in (prev_result or {}).get("ips", []):
        addr, _, prefix = str(ip["address"]).partition("/")
        bits = 128 if ":" in addr else 32
        iface = ip.get("interface")
        out.append(
            {
                "Interface": iface if isinstance(iface, int) else None,
                "Address": {"IP": addr, "Mask": _mask_b64(int(prefix), bits)},
                "Gateway": str(ip.get("gateway") or ""),
            }
        )
    return out


def add_event_body(
    netns: str, pod_name: str, pod_namespace: str, ips: Sequence[Mapping[str, Any]]
) -> bytes:
    return json_codec.dumps(
        {"Netns": netns, "PodName": pod_name, "PodNamespace": pod_namespace, "IPs": list(ips)}
    ).encode()


def _connect(path: str, timeout: float) -> _socket.socket:
    """Connect, waiting out a full listen backlog (EAGAIN on a unix socket) until
    ``timeout``: many sandboxes created at once all knock at the same moment."""
    deadline = time.monotonic() + timeout
    while True:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            return sock
        except BlockingIOError:
            sock.close()
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"the agent's listen backlog stayed full for {timeout:g}s"
                ) from None
            time.sleep(0.005)
        except BaseException:
            sock.close()
            raise


def _exchange(
    path: str,
    timeout: float,
    method: str,
    target: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    """One HTTP request to the agent over its unix socket; every way of not getting an
    answer becomes :class:`AgentUnreachableError` naming the socket and what to check."""
    try:
        sock = _connect(path, timeout)
    except OSError as e:
        raise AgentUnreachableError(
            f"cannot connect to the istio-cni node agent at {path} ({e.strerror or e}); "
            "is the istio-cni-node pod on this node running and ready?"
        ) from None
    try:
        return http_wire.exchange(sock, method, target, host="unix", body=body, headers=headers)
    except TimeoutError:
        raise AgentUnreachableError(
            f"the istio-cni node agent at {path} did not answer within {timeout:g}s"
        ) from None
    except (OSError, http_wire.HttpError) as e:
        raise AgentUnreachableError(
            f"the istio-cni node agent at {path} broke the connection: {e}"
        ) from None
    finally:
        sock.close()


def push_add_event(run_dir: str, body: bytes, timeout: float = AGENT_TIMEOUT_S) -> str:
    """Ask the agent to enroll the pod and wait for its verdict (fail closed on errors);
    returns the agent's reply (``enrolled``, or why the pod was not)."""
    path = os.path.join(run_dir, PLUGIN_EVENT_SOCKET)
    headers = {"Content-Type": "application/json"}
    status, reply = _exchange(path, timeout, "POST", "/cmdadd", body, headers)
    text = reply.decode("utf-8", "replace").strip()
    if status != 200:
        raise AgentFailedError(status, text)
    return text


def query_pod(
    run_dir: str, namespace: str, name: str, timeout: float = QUERY_TIMEOUT_S
) -> dict[str, Any] | None:
    """The agent's view of a pod (``GET /pod``): ``{"known", "ambient", "reason"}``, or
    None when the agent cannot say (old agent without the endpoint, odd reply)."""
    path = os.path.join(run_dir, PLUGIN_EVENT_SOCKET)
    query = f"/pod?ns={_quote(namespace)}&name={_quote(name)}"
    status, reply = _exchange(path, timeout, "GET", query)
    if status != 200:
        return None
    try:
        doc = json_codec.loads(reply)
    except ValueError:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("known"), bool):
        return None
    return doc


def _quote(value: str) -> str:
    # Kubernetes names are DNS labels/subdomains; escape anything else rather than trust it.
    return "".join(
        chr(b) if chr(b).isascii() and (chr(b).isalnum() or chr(b) in "-._") else f"%{b:02X}"
        for b in value.encode()
    )


def push_logs(run_dir: str, records: Sequence[Mapping[str, Any]]) -> None:
    """Best effort: POST log records to the agent's ``log.sock`` when it exists."""
    path = os.path.join(run_dir, PLUGIN_LOG_SOCKET)
    if not records or not os.path.exists(path):
        return
    body = json_codec.dumps([json_codec.dumps(r) for r in records]).encode()
    try:
        sock = _connect(path, LOG_TIMEOUT_S)
    except OSError:
        return
    try:
        http_wire.exchange(
            sock,
            "POST",
            "/log",
            host="unix",
            body=body,
            headers={"Content-Type": "application/json"},
        )
    except (OSError, http_wire.HttpError):
        pass
    finally:
        sock.close()
