"""Debian's ``prometheus`` server on the testbed node, scraping the ``istio-cni-node`` pod the
way a cluster's Prometheus finds it: Kubernetes pod discovery through the API server, kept
by the chart's ``prometheus.io/scrape|port|path`` annotations (no static target).

Role: :func:`start` writes the config under the node's state dir and starts the server in
the node's network namespace (loopback :9090, so several nodes never collide; ``down``
stops it with the node); :func:`query` asks its HTTP API an instant PromQL query.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.parse
from typing import Any

from testbed.node import Testbed

PORT = 9090
SCRAPE_SECONDS = 2


class PrometheusError(RuntimeError):
    """Prometheus is missing, did not start, or a query failed (the message says which)."""


def config(kubeconfig: str, namespace: str) -> str:
    """prometheus.yml: pods of ``namespace`` annotated ``prometheus.io/scrape: "true"``."""
    doc = {
        "global": {"scrape_interval": f"{SCRAPE_SECONDS}s", "evaluation_interval": "10s"},
        "scrape_configs": [{
            "job_name": "kubernetes-pods",
            "kubernetes_sd_configs": [{"role": "pod", "kubeconfig_file": kubeconfig,
                                       "namespaces": {"names": [namespace]}}],
            "relabel_configs": [
                {"source_labels": ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"],
                 "action": "keep", "regex": "true"},
                {"source_labels": ["__address__",
                                   "__meta_kubernetes_pod_annotation_prometheus_io_port"],
                 "action": "replace", "regex": r"([^:]+)(?::\d+)?;(\d+)",
                 "replacement": "$1:$2", "target_label": "__address__"},
                {"source_labels": ["__meta_kubernetes_pod_annotation_prometheus_io_path"],
                 "action": "replace", "regex": "(.+)", "target_label": "__metrics_path__"},
                {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
                {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            ],
        }],
    }  # fmt: skip
    return json.dumps(doc, indent=2)  # JSON is YAML


def start(bed: Testbed, info: dict[str, Any], namespace: str) -> int:
    """Start Prometheus on the node; returns its pid once its API answers."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise PrometheusError("prometheus missing: install Debian's prometheus (make setup)")
    state = bed.layout.state_dir / "prometheus"
    state.mkdir(exist_ok=True)
    conf = state / "prometheus.yml"
    conf.write_text(config(info["kubeconfig_node"], namespace))
    launch = bed._launcher
    launch.start("prometheus", [binary, f"--config.file={conf}",
                                f"--storage.tsdb.path={state / 'data'}",
                                f"--web.listen-address=127.0.0.1:{PORT}"])  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if "prometheus" in launch.exited():
            raise PrometheusError(f"prometheus exited:\n{launch.log_tail('prometheus')}")
        try:
            bed.node_http_get("127.0.0.1", PORT, "/-/ready", timeout=1.0)
            return launch.pids["prometheus"]
        except Exception:  # not listening yet
            time.sleep(0.3)
    raise PrometheusError(f"prometheus not ready after 60s:\n{launch.log_tail('prometheus')}")


def query(bed: Testbed, expr: str) -> list[dict[str, Any]]:
    """The result vector of an instant query (``[]`` when no series matches)."""
    path = "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    body = json.loads(bed.node_http_get("127.0.0.1", PORT, path, timeout=5.0))
    if body.get("status") != "success":
        raise PrometheusError(f"query {expr!r}: {body.get('error', body)}")
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def wait_series(bed: Testbed, expr: str, timeout: float = 30.0) -> list[dict[str, Any]]:
    """Poll ``expr`` until it returns a series (scrapes come every few seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        result = query(bed, expr)
        if result:
            return result
        if time.monotonic() > deadline:
            raise PrometheusError(f"no series for {expr!r} after {timeout:g}s: is the pod "
                                  "scraped? see /api/v1/targets")  # fmt: skip
        time.sleep(0.5)
