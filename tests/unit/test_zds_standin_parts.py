"""Pieces of the ztunnel stand-in that need no namespaces: the mesh CA and the access log."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from pathlib import Path

from cryptography import x509

from testbed.ztunnel_standin.access_log import AccessLog, ConnRecord
from testbed.ztunnel_standin.identity import MeshCa, peer_identity, spiffe_id

SEED_FIELDS = [
    "src.addr", "src.workload", "src.namespace", "src.identity", "dst.addr", "dst.hbone_addr",
    "dst.service", "dst.workload", "dst.namespace", "dst.identity", "direction", "bytes_sent",
    "bytes_recv", "duration",
]  # fmt: skip


def test_workload_certificates_are_mutual_tls_with_spiffe_ids(tmp_path: Path) -> None:
    ca = MeshCa(str(tmp_path / "ca"))
    a, b = ca.issue("ua", "ns-a", "sa-a"), ca.issue("ub", "ns-b", "sa-b")
    assert a.identity == "spiffe://cluster.local/ns/ns-a/sa/sa-a" == spiffe_id("ns-a", "sa-a")
    assert sorted(p.name for p in (tmp_path / "ca").iterdir()) == [
        "root-cert.pem",
        "root-key.pem",
    ]  # fmt: skip  (workload key files do not linger)
    left, right = socket.socketpair()
    seen: dict[str, str | None] = {}

    def serve() -> None:
        with b.server.wrap_socket(right, server_side=True) as s:
            seen["server saw"] = peer_identity(s.getpeercert())
            s.sendall(s.recv(5))

    t = threading.Thread(target=serve)
    t.start()
    with a.client.wrap_socket(left) as c:
        seen["client saw"] = peer_identity(c.getpeercert())
        c.sendall(b"hello")
        assert c.recv(5) == b"hello"
        assert c.version() == "TLSv1.3"
    t.join()
    assert seen == {"server saw": a.identity, "client saw": b.identity}


def test_ca_persists_and_a_foreign_ca_is_not_trusted(tmp_path: Path) -> None:
    root = Path(MeshCa(str(tmp_path / "ca")).root_path)
    before = root.read_bytes()
    again = MeshCa(str(tmp_path / "ca"))  # a restarted stand-in keeps trusting old certs
    assert root.read_bytes() == before
    foreign = MeshCa(str(tmp_path / "other")).issue("x", "ns", "sa")
    mine = again.issue("y", "ns", "sa")
    left, right = socket.socketpair()
    errors: list[Exception] = []

    def serve() -> None:
        try:
            with mine.server.wrap_socket(right, server_side=True) as s:
                s.recv(1)
        except (ssl.SSLError, OSError) as e:
            errors.append(e)

    t = threading.Thread(target=serve)
    t.start()
    try:
        with foreign.client.wrap_socket(left) as c:
            c.sendall(b"x")
            c.recv(1)
    except (ssl.SSLError, OSError) as e:
        errors.append(e)
    t.join()
    assert errors, "a certificate from another CA was accepted"
    cert = x509.load_pem_x509_certificate((tmp_path / "ca" / "root-cert.pem").read_bytes())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_access_log_line_has_the_seed_fields(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    rec = ConnRecord("inbound", "10.0.0.1:4242", "10.0.0.2:8080", start=time.monotonic())
    rec.src_identity = "spiffe://cluster.local/ns/a/sa/a"
    rec.bytes_sent, rec.bytes_recv = 12, 34
    log.write(rec)
    rec.error = "connect 10.0.0.2:8080: refused"
    log.write(rec)
    log.close()
    first, second = (json.loads(x) for x in path.read_text().splitlines())
    assert [k for k in first if k in SEED_FIELDS] == SEED_FIELDS
    assert first["message"] == "connection complete" and first["bytes_recv"] == 34
    assert str(first["duration"]).endswith("ms") and "error" not in first
    assert second["error"] == "connect 10.0.0.2:8080: refused"


def test_directory_names_hbone_peers_only_for_pods_annotated_enabled() -> None:
    """istiod tells ztunnel HBONE for a pod once annotated ``enabled``: not pending, not
    unannotated, not a finished pod; the identity comes from its service account."""
    from cni_plugin import constants as c
    from testbed.ztunnel_standin.directory import Peer, peers_of

    def pod(annotation: str | None, phase: str = "Running") -> dict[str, object]:
        ann = {} if annotation is None else {c.REDIRECTION_ANNOTATION: annotation}
        return {
            "metadata": {"name": "web", "namespace": "shop", "uid": "u", "annotations": ann},
            "spec": {"serviceAccountName": "web-sa"},
            "status": {"phase": phase, "podIP": "10.1.0.5", "podIPs": [{"ip": "10.1.0.5"}]},
        }

    want = Peer("web", "shop", "spiffe://cluster.local/ns/shop/sa/web-sa")
    assert peers_of(pod(c.REDIRECTION_ENABLED)) == {"10.1.0.5": want}
    assert peers_of(pod(c.REDIRECTION_PENDING)) == {}
    assert peers_of(pod(None)) == {}
    assert peers_of(pod(c.REDIRECTION_ENABLED, "Succeeded")) == {}
