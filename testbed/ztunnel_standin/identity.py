"""The testbed's mesh CA: one root, a certificate per workload with its SPIFFE id.

Stands in for istiod's CA. The root key and certificate live in ``ca_dir`` (created once,
reused by later runs so restarts keep trust); workload certificates are issued in memory
for ``spiffe://cluster.local/ns/<ns>/sa/<sa>`` (SAN URI, as Istio issues them) and written
next to the root only because ``ssl`` loads key pairs from files. Everything is EC P-256.
"""

from __future__ import annotations

import datetime
import os
import ssl
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

TRUST_DOMAIN = "cluster.local"


def spiffe_id(namespace: str, service_account: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{service_account}"


@dataclass
class WorkloadTls:
    """TLS contexts of one workload: as HBONE server (15008) and as HBONE client."""

    identity: str
    server: ssl.SSLContext
    client: ssl.SSLContext


class MeshCa:
    def __init__(self, ca_dir: str) -> None:
        self.ca_dir = ca_dir
        os.makedirs(ca_dir, mode=0o700, exist_ok=True)
        self.root_path = os.path.join(ca_dir, "root-cert.pem")
        key_path = os.path.join(ca_dir, "root-key.pem")
        if os.path.exists(self.root_path) and os.path.exists(key_path):
            with open(key_path, "rb") as f:
                key = serialization.load_pem_private_key(f.read(), None)
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            self._key = key
            with open(self.root_path, "rb") as f:
                self._cert = x509.load_pem_x509_certificate(f.read())
        else:
            self._key = ec.generate_private_key(ec.SECP256R1())
            name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "testbed mesh CA")])
            now = datetime.datetime.now(datetime.UTC)
            self._cert = (
                x509.CertificateBuilder()
                .subject_name(name)
                .issuer_name(name)
                .public_key(self._key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=365))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(
                    x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                    critical=True,
                )
                .sign(self._key, hashes.SHA256())
            )
            _write(
                key_path,
                self._key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ),
            )
            _write(self.root_path, self._cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, uid: str, namespace: str, service_account: str) -> WorkloadTls:
        """A fresh key and certificate for a workload, and its TLS contexts (mutual TLS,
        peers verified against this root; callers check the peer's SPIFFE id themselves)."""
        identity = spiffe_id(namespace, service_account)
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]),
                critical=True,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        pem += cert.public_bytes(serialization.Encoding.PEM)
        path = os.path.join(self.ca_dir, f"workload-{uid}.pem")
        _write(path, pem)
        try:
            server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            for ctx in (server, client):
                ctx.minimum_version = ssl.TLSVersion.TLSv1_3
                ctx.load_cert_chain(path)
                ctx.load_verify_locations(self.root_path)
                ctx.verify_mode = ssl.CERT_REQUIRED
            client.check_hostname = False  # peers are named by SPIFFE URI, checked by callers
        finally:
            os.unlink(path)
        return WorkloadTls(identity, server, client)


def peer_identity(peercert: object) -> str | None:
    """The SPIFFE URI SAN of a verified peer certificate (``SSLSocket.getpeercert()``)."""
    if not isinstance(peercert, dict):
        return None
    for kind, value in peercert.get("subjectAltName", ()):
        if kind == "URI" and str(value).startswith("spiffe://"):
            return str(value)
    return None


def _write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
