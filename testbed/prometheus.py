"""Debian's ``prometheus`` server on the testbed node, scraping the ``istio-cni-node`` pod
found by the chart's ``prometheus.io/scrape|port|path`` annotations.

Debian builds Prometheus without Kubernetes service discovery (``kubernetes_sd_configs`` is
not a known field there), so the testbed does that part: :func:`targets` turns the pods'
annotations and IPs into a ``file_sd`` target file, as Kubernetes pod discovery plus the
usual relabelling would. Role: :func:`start` writes config and targets under the node's
state dir and starts the server in the node's network namespace (loopback :9090, so several
nodes never collide; ``down`` stops it with the node); :func:`query` asks its HTTP API an
instant PromQL query.
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


def targets(pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """file_sd target groups of the pods annotated ``prometheus.io/scrape: "true"``:
    ``<pod IP>:<prometheus.io/port>``, ``__metrics_path__`` from ``prometheus.io/path``."""
    groups: list[dict[str, Any]] = []
    for pod in pods:
        meta, status = pod["metadata"], pod.get("status") or {}
        ann = meta.get("annotations") or {}
        if ann.get("prometheus.io/scrape") != "true" or not status.get("podIP"):
            continue
        groups.append({
            "targets": [f"{status['podIP']}:{ann.get('prometheus.io/port', '80')}"],
            "labels": {"__metrics_path__": ann.get("prometheus.io/path", "/metrics"),
                       "namespace": meta["namespace"], "pod": meta["name"]},
        })  # fmt: skip
    return groups


def config(targets_file: str) -> str:
    """prometheus.yml: one job over the target file (re-read every few seconds)."""
    doc = {
        "global": {"scrape_interval": f"{SCRAPE_SECONDS}s", "evaluation_interval": "10s"},
        "scrape_configs": [{
            "job_name": "kubernetes-pods",
            "file_sd_configs": [{"files": [targets_file], "refresh_interval": "5s"}],
        }],
    }  # fmt: skip
    return json.dumps(doc, indent=2)  # JSON is YAML


def write_targets(bed: Testbed, pods: list[dict[str, Any]]) -> None:
    """(Re)write the target file from the pods (e.g. after a rollout made a new one)."""
    path = bed.layout.state_dir / "prometheus" / "targets.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(targets(pods)))
    tmp.rename(path)


def start(bed: Testbed, pods: list[dict[str, Any]]) -> int:
    """Start Prometheus on the node scraping ``pods``; returns its pid once it answers."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise PrometheusError("prometheus missing: install Debian's prometheus (make setup)")
    state = bed.layout.state_dir / "prometheus"
    state.mkdir(exist_ok=True)
    conf = state / "prometheus.yml"
    write_targets(bed, pods)
    conf.write_text(config(str(state / "targets.json")))
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
