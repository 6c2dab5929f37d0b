"""The testbed's stand-in for Kubernetes pod discovery: annotated pods become file_sd
targets at the annotated port and path; unannotated or IP-less pods do not."""

from __future__ import annotations

from typing import Any

from testbed.prometheus import targets


def pod(name: str, ip: str | None, **ann: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "istio-cni", "annotations": ann},
            "status": {"podIP": ip} if ip else {}}  # fmt: skip


def test_annotated_pods_become_targets_at_their_port_and_path() -> None:
    got = targets([
        pod("istio-cni-node-a", "10.77.0.2", **{"prometheus.io/scrape": "true",
            "prometheus.io/port": "15014", "prometheus.io/path": "/metrics"}),
        pod("other", "10.77.0.3"),
        pod("pending", None, **{"prometheus.io/scrape": "true"}),
    ])  # fmt: skip
    assert got == [{"targets": ["10.77.0.2:15014"],
                    "labels": {"__metrics_path__": "/metrics", "namespace": "istio-cni",
                               "pod": "istio-cni-node-a"}}]  # fmt: skip
