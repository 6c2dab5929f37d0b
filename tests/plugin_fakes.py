"""Test-only stand-ins for the plugin's peers, and a way to run the plugin like a runtime.

- :class:`AgentStub`: an HTTP server on a real unix socket speaking the agent's side of
  ``pluginevent.sock`` (``GET /pod``, ``POST /cmdadd``) and recording every request, used
  until a test runs the real :mod:`node_agent.plugin_events` server.
- :class:`ApiStub`: an HTTPS server on 127.0.0.1 answering ``GET`` pod and namespace, with a
  freshly made self-signed certificate, standing in for kube-apiserver (which only runs on
  the testbed).
- :func:`run_plugin`: exec the plugin with a CNI environment and stdin, as a runtime does;
  :func:`built_plugin`: the shipped executable form, for running the same cases against it.
"""

from __future__ import annotations

import datetime
import http.server
import ipaddress
import json
import os
import socketserver
import ssl
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.time_scale import scaled

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The plugin as a runtime would exec it from a source checkout: isolated, no site.
PLUGIN_CMD = [
    sys.executable,
    "-I",
    "-S",
    "-c",
    f"import sys; sys.path.insert(0, {ROOT!r}); from cni_plugin.plugin import main; main()",
]


BUILT_PLUGIN = os.path.join(ROOT, "build", "istio-cni")
_built: list[str] = []


def built_plugin() -> str:
    """``build/istio-cni`` for the current sources, built once per session: the build
    script rebuilds the shipped form only when its source hash changed (about a second)."""
    if not _built:
        subprocess.run(
            ["bash", os.path.join(ROOT, "scripts", "build-plugin.sh")],
            check=True,
            cwd=ROOT,
            timeout=1200,
        )
        _built.append(BUILT_PLUGIN)
    return _built[0]


@pytest.fixture(autouse=True, params=["source", "built"])
def plugin_form(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Imported by a test module: each of its cases runs against the source form and the
    shipped executable alike (the bundle holds only the modules found for it: a missing
    one shows up here)."""
    if request.param == "built":
        monkeypatch.setattr(sys.modules[__name__], "PLUGIN_CMD", [built_plugin()])
    return str(request.param)


@dataclass
class Recorded:
    method: str
    path: str
    body: bytes


@dataclass
class AgentStub:
    """Answers like the node agent; ``pods`` maps (ns, name) -> the /pod JSON reply."""

    run_dir: str
    pods: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    add_status: int = 200
    add_reply: str = "enrolled"
    requests: list[Recorded] = field(default_factory=list)
    _server: Any = None

    def start(self) -> AgentStub:
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, code: int, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                stub.requests.append(Recorded("GET", self.path, b""))
                from urllib.parse import parse_qs, urlsplit

                q = parse_qs(urlsplit(self.path).query)
                key = (q.get("ns", [""])[0], q.get("name", [""])[0])
                doc = stub.pods.get(key, {"known": False, "ambient": False, "reason": "unseen"})
                self._reply(200, json.dumps(doc).encode())

            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n)
                stub.requests.append(Recorded("POST", self.path, body))
                reply = stub.add_reply
                if self.path == "/cmdadd":
                    # Like the agent: a pod it knows is not ambient is answered, not enrolled.
                    doc = json.loads(body)
                    known = stub.pods.get((doc["PodNamespace"], doc["PodName"]), {})
                    if known.get("known") and not known.get("ambient"):
                        reply = f"not enrolled: {known.get('reason', '')}"
                self._reply(stub.add_status if self.path == "/cmdadd" else 200, reply.encode())

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        os.makedirs(self.run_dir, exist_ok=True)
        self._server = Server(os.path.join(self.run_dir, "pluginevent.sock"), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            os.unlink(os.path.join(self.run_dir, "pluginevent.sock"))
            self._server = None

    def posts(self) -> list[Recorded]:
        return [r for r in self.requests if r.method == "POST" and r.path == "/cmdadd"]


def self_signed_cert(directory: str) -> tuple[str, str, bytes]:
    """(cert path, key path, cert PEM) for 127.0.0.1, made with ``cryptography``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_path = os.path.join(directory, "api.crt")
    key_path = os.path.join(directory, "api.key")
    with open(cert_path, "wb") as f:
        f.write(pem)
    with open(key_path, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return cert_path, key_path, pem


@dataclass
class ApiStub:
    """``GET /api/v1/namespaces/<ns>[/pods/<name>]`` from ``objects`` (path -> JSON)."""

    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    token: str = "test-token"
    requests: list[str] = field(default_factory=list)
    port: int = 0
    ca_pem: bytes = b""
    _server: Any = None

    def start(self, netns: str | None = None) -> ApiStub:
        """Listen on 127.0.0.1 of ``netns`` (a /run/netns path) or of this process."""
        stub = self
        tmp = tempfile.mkdtemp(prefix="icnit-api-")
        cert, key, self.ca_pem = self_signed_cert(tmp)

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                stub.requests.append(self.path)
                if self.headers.get("Authorization") != f"Bearer {stub.token}":
                    code, body = 401, b'{"kind":"Status","code":401}'
                elif self.path in stub.objects:
                    code, body = 200, json.dumps(stub.objects[self.path]).encode()
                else:
                    code, body = 404, b'{"kind":"Status","code":404}'
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        if netns is None:
            server = Server(("127.0.0.1", 0), Handler)
        else:
            from cni_plugin.netns import run_in_netns

            # A socket belongs to the namespace of the thread that made it.
            server = run_in_netns(netns, lambda: Server(("127.0.0.1", 0), Handler))
        server.socket = ctx.wrap_socket(server.socket, server_side=True)
        self.port = server.server_address[1]
        self._server = server
        for p in (cert, key):
            os.unlink(p)
        os.rmdir(tmp)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def add_pod(
        self,
        ns: str,
        name: str,
        labels: Mapping[str, str] | None = None,
        ns_labels: Mapping[str, str] | None = None,
        annotations: Mapping[str, str] | None = None,
    ) -> None:
        self.objects[f"/api/v1/namespaces/{ns}/pods/{name}"] = {
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": ns,
                "labels": dict(labels or {}),
                "annotations": dict(annotations or {}),
            },
            "spec": {},
        }
        self.objects.setdefault(
            f"/api/v1/namespaces/{ns}",
            {"kind": "Namespace", "metadata": {"name": ns, "labels": dict(ns_labels or {})}},
        )

    def write_kubeconfig(self, run_dir: str, *, insecure: bool = False) -> str:
        from install import kubeconfig

        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, "istio-cni-kubeconfig")
        text = kubeconfig.render(
            f"https://127.0.0.1:{self.port}", self.token, None if insecure else self.ca_pem
        )
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o600)
        return path


def cni_env(command: str, **extra: str) -> dict[str, str]:
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": "0123456789abcdef",
        "CNI_NETNS": "/var/run/netns/cni-test",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/usr/lib/cni",
        "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=app-1;"
        "K8S_POD_INFRA_CONTAINER_ID=0123456789abcdef;K8S_POD_UID=u-1",
    }
    env.update(extra)
    return env


def run_plugin(
    env: Mapping[str, str], stdin: bytes, cmd: list[str] | None = None, timeout: float = 20
) -> subprocess.CompletedProcess[bytes]:
    """Exec the plugin with exactly ``env`` (nothing inherited), as a runtime does."""
    return subprocess.run(
        cmd or PLUGIN_CMD, input=stdin, env=dict(env), capture_output=True, timeout=scaled(timeout)
    )


def net_conf(version: str = "1.0.0", **fields: Any) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "cniVersion": version,
        "name": "k8s-pod-network",
        "type": "istio-cni",
        "plugin_log_level": "debug",
        "ambient_enabled": True,
        "exclude_namespaces": ["kube-system"],
        "pod_namespace": "istio-cni",
        "prevResult": {
            "cniVersion": version,
            "interfaces": [{"name": "eth0", "mac": "aa:bb:cc:dd:ee:ff", "sandbox": "/x"}],
            "ips": [{"address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 0}],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dns": {},
        },
    }
    conf.update(fields)
    return conf
