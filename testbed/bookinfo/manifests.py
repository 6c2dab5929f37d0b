"""Istio's bookinfo as Kubernetes objects for the testbed node: :func:`objects`, :func:`pod`.

Role: productpage-v1, details-v1, ratings-v1, reviews-v1/v2/v3 (and reviews-v4, added
later by the demo) plus a ``curl`` client pod, each with its own ServiceAccount (the
SPIFFE identity the mesh gives it) and an HTTP readiness probe. productpage calls details
and reviews; reviews v2, v3 and v4 call ratings; v1 calls nothing. Paths are bookinfo's:
``/productpage``, ``/details/0``, ``/reviews/0``, ``/ratings/0``, plus ``/health``.

Images: no separate build. Every pod runs the testbed's own ``busybox`` image (Debian's
``busybox-static``, made by :mod:`testbed.images`) with the two shell scripts of this
package mounted from a ConfigMap: ``start.sh`` (PID 1: ``nc -ll`` forking ``serve.sh`` per
connection) and ``serve.sh`` (one HTTP exchange; upstream calls with busybox ``wget``).

Addressing: the testbed runs no kube-proxy and no cluster DNS, so a ClusterIP would not
route and a service name would not resolve. Each caller is given its upstreams' pod IPs in
its environment instead (``DETAILS``, ``REVIEWS`` = a list, picked at random per request,
``RATINGS``), which is why pods start in :func:`waves` (callees first).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

NAMESPACE = "bookinfo"
PORT = 9080
CONFIGMAP = "bookinfo-app"
SCRIPTS_DIR = Path(__file__).parent
SCRIPTS = ("start.sh", "serve.sh")
CLIENT = "curl"


@dataclass(frozen=True)
class Workload:
    """One bookinfo pod: ``app`` (and so its ServiceAccount ``bookinfo-<app>``), version,
    and the apps it calls."""

    app: str
    version: str
    calls: tuple[str, ...] = ()
    startup_call: str | None = None  # an app fetched once before serving (reviews-v4)

    @property
    def name(self) -> str:
        return f"{self.app}-{self.version}"

    @property
    def service_account(self) -> str:
        return f"bookinfo-{self.app}"


BOOKINFO: tuple[Workload, ...] = (
    Workload("details", "v1"),
    Workload("ratings", "v1"),
    Workload("reviews", "v1"),
    Workload("reviews", "v2", calls=("ratings",)),
    Workload("reviews", "v3", calls=("ratings",)),
    Workload("productpage", "v1", calls=("details", "reviews")),
)
LATE = Workload("reviews", "v4", calls=("ratings",), startup_call="ratings")


def waves(workloads: tuple[Workload, ...] = BOOKINFO) -> list[list[Workload]]:
    """Start order: every workload after the apps it calls (their IPs go in its env)."""
    out: list[list[Workload]] = []
    done: set[str] = set()
    left = list(workloads)
    while left:
        wave = [w for w in left if all(c in done for c in w.calls)]
        if not wave:
            raise ValueError(f"bookinfo call graph has a cycle among {[w.name for w in left]}")
        out.append(wave)
        left = [w for w in left if w not in wave]
        done |= {w.app for w in wave} - {w.app for w in left}
    return out


def upstream_env(w: Workload, ips: dict[str, str]) -> dict[str, str]:
    """``DETAILS``/``REVIEWS``/``RATINGS`` for ``w`` from pod name -> IP of the running pods.
    Only the first three reviews are productpage's upstreams (v4 joins later, on its own)."""
    env: dict[str, str] = {}
    for app in w.calls:
        names = sorted(n for n in ips if n.startswith(f"{app}-") and n != LATE.name)
        if not names:
            raise ValueError(f"{w.name} calls {app}, but no {app} pod has an IP yet")
        env[app.upper()] = " ".join(f"{ips[n]}:{PORT}" for n in names)
    if w.startup_call:
        first = env[w.startup_call.upper()].split()[0]
        env["STARTUP_CALL"] = f"{first}/{w.startup_call}/0"
    return env


def objects(namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    """The ServiceAccounts and the ConfigMap with the app scripts (the namespace is made
    by the caller, so it can label it later)."""
    apps = sorted({w.app for w in (*BOOKINFO, LATE)})
    out: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": name, "namespace": namespace},
        }
        for name in [f"bookinfo-{a}" for a in apps] + [CLIENT]
    ]
    out.append(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": CONFIGMAP, "namespace": namespace},
            "data": {s: (SCRIPTS_DIR / s).read_text() for s in SCRIPTS},
        }
    )
    return out


def pod(w: Workload, image: str, env: dict[str, str], namespace: str = NAMESPACE) -> dict[str, Any]:
    """The pod of ``w``, probed every second with Kubernetes' default failureThreshold (3):
    Ready flips only when probes fail three periods in a row."""
    variables = {"SERVICE": w.app, "VERSION": w.version, "PORT": str(PORT), **env}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": w.name,
            "namespace": namespace,
            "labels": {"app": w.app, "version": w.version},
        },
        "spec": {
            "serviceAccountName": w.service_account,
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": 2,
            "containers": [
                {
                    "name": w.app,
                    "image": image,
                    "command": ["/bin/sh", "/bookinfo/start.sh"],
                    "env": [{"name": k, "value": v} for k, v in variables.items()],
                    "ports": [{"containerPort": PORT}],
                    "readinessProbe": {
                        "httpGet": {"path": "/health", "port": PORT},
                        "periodSeconds": 1,
                        "timeoutSeconds": 3,
                        "failureThreshold": 3,
                    },
                    "volumeMounts": [{"name": "app", "mountPath": "/bookinfo"}],
                }
            ],
            "volumes": [{"name": "app", "configMap": {"name": CONFIGMAP, "defaultMode": 0o755}}],
        },
    }


def client_pod(image: str, namespace: str = NAMESPACE) -> dict[str, Any]:
    """``curl``: the pod requests are sent from (``kubectl exec curl -- wget ...``), as in
    Istio's walkthrough; the busybox image idles until SIGTERM."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": CLIENT, "namespace": namespace, "labels": {"app": CLIENT}},
        "spec": {
            "serviceAccountName": CLIENT,
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": 2,
            "containers": [
                {
                    "name": CLIENT,
                    "image": image,
                    "readinessProbe": {
                        "exec": {"command": ["test", "-x", "/bin/wget"]},
                        "periodSeconds": 1,
                    },
                }
            ],
        },
    }


def as_list(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "List", "items": items}
