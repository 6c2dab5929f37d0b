"""The agent's Prometheus series against Istio's definitions (cni/pkg/install, nodeagent,
repair): names, label values, ``ztunnel_connected`` as a connection count, and the process
series a Prometheus user expects. Scraped in Prometheus' text format from the registry."""

from __future__ import annotations

import os

from prometheus_client import generate_latest

from install.installer import Installer
from node_agent.metrics import AgentMetrics
from tests.unit.test_install_conflist import ref
from tests.unit.test_install_installer import config, node, put  # noqa: F401 (fixture)


def scrape(m: AgentMetrics) -> str:
    return generate_latest(m.registry).decode()


def test_ztunnel_connected_counts_connections_at_scrape_time() -> None:
    m = AgentMetrics()
    conns = [0]
    m.count_ztunnel_connections(lambda: conns[0])
    assert "ztunnel_connected 0.0" in scrape(m)
    conns[0] = 2  # a restarting ztunnel: old and new connection at once
    assert "ztunnel_connected 2.0" in scrape(m)


def test_process_series_and_istios_names_are_exported() -> None:
    text = scrape(AgentMetrics())
    for series in (
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
        "python_info",
        "python_gc_collections_total",
    ):
        assert f"\n{series}" in text, series
    for name, kind in (
        ("istio_cni_installs_total", "counter"),
        ("istio_cni_install_ready", "gauge"),
        ("nodeagent_reconcile_events_total", "counter"),
        ("istio_cni_plugin_requests_total", "counter"),
        ("ztunnel_connected", "gauge"),
        ("istio_cni_repair_pods_repaired_total", "counter"),
    ):
        assert f"# TYPE {name} {kind}" in text, name
    # No repair controller here: the series is defined, never has a sample.
    assert "istio_cni_repair_pods_repaired_total{" not in text


def test_install_results_carry_istios_label_values(node: dict[str, str]) -> None:  # noqa: F811
    inst = Installer(config(node, kube_ca_file=os.path.join(node["sa"], "missing.crt")))
    m = AgentMetrics()
    put(os.path.join(node["net"], "10-list.conflist"), ref("list.conflist"))
    assert not inst._install_counted()  # no CA: the kubeconfig step fails
    os.unlink(os.path.join(node["src"], "istio-cni"))
    assert not inst._install_counted()  # no plugin to copy
    m.mirror_installer(inst, agent_ready=False)
    text = scrape(m)
    assert 'istio_cni_installs_total{result="CREATE_KUBECONFIG_FAILURE"} 1.0' in text
    assert 'istio_cni_installs_total{result="COPY_BINARIES_FAILURE"} 1.0' in text
    put(os.path.join(node["src"], "istio-cni"), b"#!/bin/sh\n")
    ok = Installer(config(node))
    assert ok._install_counted()
    m.mirror_installer(ok, agent_ready=True)
    assert 'istio_cni_installs_total{result="SUCCESS"} 1.0' in scrape(m)
    assert "istio_cni_install_ready 0.0" in scrape(m)  # installed once, not watching
