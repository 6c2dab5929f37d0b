"""The plugin's kubeconfig, byte for byte as Istio 1.24 writes it (SPEC §7).

Cluster ``local`` at ``https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`` with the
service account CA (base64 of the CA file as is) or ``insecure-skip-tls-verify: true``;
user ``istio-cni`` with the service account token; context ``istio-cni-context``. See
``reference/istio-1.24/install/kubeconfig-*``. The plugin reads it with a line parser
(:mod:`cni_plugin.kube_lookup`), so the shape here is part of that contract too.
"""

from __future__ import annotations

import base64

from cni_plugin.errors import ConfigError


def server_url(host: str, port: str) -> str:
    if not host or not port:
        raise ConfigError(
            "KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT must be set (Kubernetes sets "
            "them in every pod; set them by hand when running the installer outside one)"
        )
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal, as Go's net.JoinHostPort does
    return f"https://{host}:{port}"


def render(server: str, token: str, ca_pem: bytes | None) -> str:
    """``ca_pem`` None means insecure-skip-tls-verify."""
    if ca_pem is None:
        trust = "    insecure-skip-tls-verify: true\n"
    else:
        trust = f"    certificate-authority-data: {base64.b64encode(ca_pem).decode()}\n"
    return (
        "apiVersion: v1\n"
        "clusters:\n"
        "- cluster:\n"
        f"{trust}"
        f"    server: {server}\n"
        "  name: local\n"
        "contexts:\n"
        "- context:\n"
        "    cluster: local\n"
        "    user: istio-cni\n"
        "  name: istio-cni-context\n"
        "current-context: istio-cni-context\n"
        "kind: Config\n"
        "preferences: {}\n"
        "users:\n"
        "- name: istio-cni\n"
        "  user:\n"
        f"    token: {token}\n"
    )
