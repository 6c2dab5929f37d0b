"""Prometheus metrics on ``:15014/metrics`` (MONITORING_PORT) with the SPEC §4 names, plus
enrolment latency histograms. One private registry per agent (tests run several agents in
one process); :class:`AgentMetrics` is the only writer.

Every series Istio's agent defines (``cni/pkg/install/monitoring.go``,
``cni/pkg/nodeagent``, ``cni/pkg/repair/monitoring.go``), with its name, labels and label
values: ``istio_cni_installs_total{result=SUCCESS|COPY_BINARIES_FAILURE|
CREATE_KUBECONFIG_FAILURE|CREATE_CNI_CONFIG_FAILURE}``, ``istio_cni_install_ready``,
``nodeagent_reconcile_events_total{type}``, ``istio_cni_plugin_requests_total
{response_code}``, ``ztunnel_connected`` (the number of ztunnel connections, read at scrape
time) and ``istio_cni_repair_pods_repaired_total{type,result}``, which stays without samples:
this agent has no repair controller (Istio's repairs sidecar pods that raced the plugin).
Where Istio's Go exporter adds the Go runtime's ``process_*`` series, ours has the same
``process_*`` names from prometheus_client's process collector, plus ``python_info`` and
``python_gc_*``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from node_agent.http_serving import BoundedHandler, BoundedHTTPServer

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


class InstallerStatus(Protocol):
    """What the metrics read from an in-process installer (:class:`install.installer.Installer`)."""

    @property
    def ready(self) -> bool: ...

    @property
    def installs_total(self) -> Mapping[str, int]: ...


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.installs = Counter(
            "istio_cni_installs", "CNI plugin installs by result", ["result"], registry=r
        )
        self.install_ready = Gauge(
            "istio_cni_install_ready", "1 when the CNI plugin is installed and ready", registry=r
        )
        self.reconcile_events = Counter(
            "nodeagent_reconcile_events", "Informer events handled, by type", ["type"], registry=r
        )
        self.ztunnel_connected = Gauge(
            "ztunnel_connected", "Connections from ztunnel to the ZDS socket", registry=r
        )
        self.plugin_requests = Counter(
            "istio_cni_plugin_requests",
            "Plugin event requests by response code",
            ["response_code"],
            registry=r,
        )
        self.enroll_latency = Histogram(
            "nodeagent_enrollment_duration_seconds",
            "Time to enroll a pod (rules, ztunnel ack, probe set, annotation)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.enrolled_pods = Gauge("nodeagent_enrolled_pods", "Pods in the mesh", registry=r)
        self.removals = Counter("nodeagent_pod_removals", "Pods taken out of the mesh", registry=r)
        self.repairs = Counter(
            "nodeagent_drift_repairs",
            "Pods repaired by the reconciler, by reason",
            ["reason"],
            registry=r,
        )
        self.not_retried = Counter(
            "nodeagent_enrollment_not_retried",
            "Pods whose enrollment failed in a way retrying cannot fix (in-pod rules could "
            "not be installed): not retried until the pod changes",
            registry=r,
        )
        self.repaired = Counter(
            "istio_cni_repair_pods_repaired",
            "Pods repaired by the repair controller (none here: no repair controller)",
            ["type", "result"],
            registry=r,
        )
        # What a Prometheus user expects of any process: process_* (cpu, memory, fds,
        # start time), python_info and python_gc_*.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self._server: BoundedHTTPServer | None = None
        self._install_seen: dict[str, int] = {}

    def count_ztunnel_connections(self, count: Callable[[], int]) -> None:
        """``ztunnel_connected`` as Istio defines it: how many ztunnel connections there
        are, read at every scrape (so a second connection during a ztunnel restart shows)."""
        self.ztunnel_connected.set_function(count)

    # EnrollmentObserver
    def enrolled(self, latency_s: float) -> None:
        self.enroll_latency.observe(latency_s)

    def removed(self) -> None:
        self.removals.inc()

    def mirror_installer(self, installer: InstallerStatus | None, agent_ready: bool) -> None:
        """Mirror the in-process installer's counters into the SPEC metric names. Without an
        in-process installer (``istio-cni-agent install`` runs apart), ready = agent ready."""
        if installer is None:
            self.install_ready.set(1 if agent_ready else 0)
            return
        self.install_ready.set(1 if installer.ready else 0)
        for result, n in dict(installer.installs_total).items():
            delta = int(n) - self._install_seen.get(result, 0)
            if delta > 0:
                self.installs.labels(result=result).inc(delta)
                self._install_seen[result] = int(n)

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serve ``/metrics`` over HTTP (bounded: read deadline, connection cap); returns the
        bound port (0 picks one)."""
        registry = self.registry

        class Handler(BoundedHandler):
            def do_GET(self) -> None:
                self.request_read()
                if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                    self.reply(404, "use /metrics")
                    return
                self.reply(200, generate_latest(registry).decode(), CONTENT_TYPE_LATEST)

        server = BoundedHTTPServer((addr, port), Handler)
        threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
        self._server = server
        return int(server.server_address[1])

    def stop(self) -> None:
        server = self._server
        if server is not None:
            server.shutdown()
            server.server_close()
            self._server = None
