"""Read a pod and its namespace from the API server, as Istio's plugin does (stdlib only).

Credentials come from ``<run_dir>/istio-cni-kubeconfig``, which the installer writes in one
fixed shape (see ``reference/istio-1.24/install/kubeconfig-*``): a ``server`` URL, either
``certificate-authority-data`` or ``insecure-skip-tls-verify: true``, and a ``token``. We
read just those keys line by line rather than carrying a YAML parser onto every host.

Two kinds of failure, handled differently by the plugin: :class:`KubeconfigError` (the file
is missing, unreadable or malformed: an installation problem, reported with its CNI code)
and :class:`ApiUnavailableError` (the API could not answer: the plugin falls back to asking
the agent). ``ssl`` is imported only here, so pods that need no lookup never pay for it.
"""

from __future__ import annotations

import binascii
import errno
import os
import socket
from typing import Any

from cni_plugin import http_wire, json_codec
from cni_plugin.constants import KUBECONFIG_NAME

API_TIMEOUT_S = 3.0
_KEYS = ("server", "certificate-authority-data", "insecure-skip-tls-verify", "token")


class KubeconfigError(Exception):
    """The plugin's kubeconfig cannot be used; ``retryable`` when it is merely absent."""

    def __init__(self, msg: str, *, retryable: bool = False, io: bool = False) -> None:
        super().__init__(msg)
        self.retryable = retryable
        self.io = io


class ApiUnavailableError(Exception):
    """The API server did not give us the pod and namespace."""


class Kubeconfig:
    def __init__(self, host: str, port: int, ca_pem: str | None, insecure: bool, token: str):
        self.host = host
        self.port = port
        self.ca_pem = ca_pem
        self.insecure = insecure
        self.token = token


def kubeconfig_path(run_dir: str) -> str:
    return os.path.join(run_dir, KUBECONFIG_NAME)


def load_kubeconfig(path: str) -> Kubeconfig:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise KubeconfigError(
            f"kubeconfig {path} does not exist yet: the istio-cni installer writes it when the "
            "istio-cni-node pod starts; retry once it is running",
            retryable=True,
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise KubeconfigError(
            f"cannot read kubeconfig {path} ({reason}): it must be a readable file written by "
            "the istio-cni installer",
            io=isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EISDIR, errno.EIO),
        ) from None
    found: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().lstrip("- ").partition(":")
        if sep and key in _KEYS and key not in found:
            found[key] = value.strip().strip("'\"")
    missing = [k for k in ("server", "token") if not found.get(k)]
    if missing:
        raise KubeconfigError(
            f"kubeconfig {path} is malformed: no {' or '.join(missing)}; delete it and restart "
            "the istio-cni-node pod so the installer rewrites it"
        )
    server = found["server"]
    if not server.startswith("https://"):
        raise KubeconfigError(
            f"kubeconfig {path}: server {server!r} is not an https:// URL; restart the "
            "istio-cni-node pod so the installer rewrites it"
        )
    hostport = server[len("https://") :].split("/", 1)[0]
    if hostport.startswith("["):
        host, _, rest = hostport[1:].partition("]")
        port_s = rest.lstrip(":")
    else:
        host, _, port_s = hostport.rpartition(":") if ":" in hostport else (hostport, "", "")
    if not host or (port_s and not port_s.isdigit()):
        raise KubeconfigError(f"kubeconfig {path}: cannot parse server {server!r}")
    ca_pem: Any = None
    if found.get("certificate-authority-data"):
        try:
            ca_pem = binascii.a2b_base64(found["certificate-authority-data"], strict_mode=True)
            ca_pem = ca_pem.decode()
            if "-----BEGIN CERTIFICATE-----" not in ca_pem:
                raise ValueError("no PEM certificate")
        except (binascii.Error, ValueError):
            raise KubeconfigError(
                f"kubeconfig {path}: certificate-authority-data is not base64 PEM"
            ) from None
    insecure = found.get("insecure-skip-tls-verify", "").lower() == "true"
    if ca_pem is None and not insecure:
        raise KubeconfigError(
            f"kubeconfig {path} has neither certificate-authority-data nor "
            "insecure-skip-tls-verify: true"
        )
    return Kubeconfig(host, int(port_s or 443), ca_pem, insecure, found["token"])


def fetch_pod_and_namespace(
    kc: Kubeconfig, namespace: str, name: str, timeout: float = API_TIMEOUT_S
) -> tuple[dict[str, Any], dict[str, Any]]:
    """GET the pod and its namespace over one TLS session each (keep-alive is not worth it)."""
    import ssl  # ~10 ms of imports: only pods that need the API pay for it

    if kc.insecure:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        try:
            ctx = ssl.create_default_context(cadata=kc.ca_pem)
        except ssl.SSLError as e:
            raise KubeconfigError(f"kubeconfig CA data is not a usable certificate: {e}") from None
    pod = _get(ctx, kc, f"/api/v1/namespaces/{namespace}/pods/{name}", timeout)
    ns = _get(ctx, kc, f"/api/v1/namespaces/{namespace}", timeout)
    return pod, ns


def _get(ctx: Any, kc: Kubeconfig, path: str, timeout: float) -> dict[str, Any]:
    where = f"https://{kc.host}:{kc.port}{path}"
    try:
        raw = socket.create_connection((kc.host, kc.port), timeout=timeout)
    except OSError as e:
        raise ApiUnavailableError(f"cannot connect to {where}: {e.strerror or e}") from None
    try:
        with ctx.wrap_socket(raw, server_hostname=kc.host) as tls:
            status, body = http_wire.exchange(
                tls,
                "GET",
                path,
                host=f"{kc.host}:{kc.port}",
                headers={"Authorization": f"Bearer {kc.token}", "Accept": "application/json"},
            )
    except (OSError, http_wire.HttpError) as e:
        raise ApiUnavailableError(f"GET {where} failed: {e}") from None
    finally:
        raw.close()
    if status != 200:
        raise ApiUnavailableError(
            f"GET {where} returned HTTP {status}: {body[:200].decode('utf-8', 'replace')}"
        )
    try:
        obj = json_codec.loads(body)
    except ValueError:
        raise ApiUnavailableError(f"GET {where} returned a body that is not JSON") from None
    if not isinstance(obj, dict):
        raise ApiUnavailableError(f"GET {where} returned {type(obj).__name__}, not an object")
    return obj
