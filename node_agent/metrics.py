"""Prometheus metrics on ``:15014/metrics`` (MONITORING_PORT) with the SPEC §4 names, plus
enrolment latency histograms. One private registry per agent (tests run several agents in
one process); :class:`AgentMetrics` is the only writer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

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
            "ztunnel_connected", "1 when ztunnel is connected to the ZDS socket", registry=r
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
        self._server: object | None = None
        self._install_seen: dict[str, int] = {}

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
        """Start the HTTP exporter; returns the bound port (0 picks one)."""
        server, _thread = start_http_server(port, addr=addr, registry=self.registry)
        self._server = server
        return int(server.server_address[1])

    def stop(self) -> None:
        server = self._server
        if server is not None:
            server.shutdown()  # type: ignore[attr-defined]
            server.server_close()  # type: ignore[attr-defined]
            self._server = None
