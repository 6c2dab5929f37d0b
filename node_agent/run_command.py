"""``istio-cni-agent run``: the node agent daemon, and its composition root (:class:`Agent`).

Start order (SPEC §4): metrics and health (not ready) -> installer (when configured) ->
host probe set and rule -> informers, wait for cache sync -> adopt pods already annotated
``enabled`` (rebuild the ZDS snapshot, namespaces found again via /proc) -> check their
rules (startup reconcile) -> ZDS server (accept ztunnel) -> plugin-event server -> ready
-> process the queue, periodic reconcile. Stop undoes the servers only: in-pod rules,
ipsets and annotations stay, so a restart does not touch a single pod's traffic.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cni_plugin import constants as c
from cni_plugin.enablement import EnablementPolicy
from cni_plugin.errors import ConfigError, IstioCniError
from cni_plugin.redirection.settings import RedirectSettings
from node_agent import logs
from node_agent.adapters import (
    SERIAL_BACKENDS,
    KubeAccess,
    NamespacesListWatch,
    PodsListWatch,
    SerialRules,
    ZdsZtunnel,
)
from node_agent.backend_selection import select_backend
from node_agent.bpf_pins import PinPruner
from node_agent.config import AgentConfig
from node_agent.enrollment import Enroller, ProbeSet, Rules
from node_agent.health import HealthServer
from node_agent.host_probe import HostProbe
from node_agent.informers import Informer
from node_agent.malloc_arenas import cap_malloc_arenas
from node_agent.metrics import AgentMetrics
from node_agent.netns_finder import NetnsFinder
from node_agent.plugin_events import PluginEventServer
from node_agent.pod_cache import PodCache
from node_agent.pod_controller import PodController
from node_agent.reconciler import Reconciler
from node_agent.resources import NamespaceInfo, PodInfo
from node_agent.state import StateExporter
from node_agent.work_queue import WorkQueue
from node_agent.zds_server import ZdsServer

if TYPE_CHECKING:
    from cni_plugin.bpf.backend import EbpfBackend

log = logging.getLogger("node_agent.agent")

HELP = "run the node agent: watch pods of this node and keep ambient pods enrolled"


class Agent:
    """The wired agent. Edges may be injected (tests); defaults are the real ones."""

    def __init__(
        self,
        cfg: AgentConfig,
        *,
        kube: KubeAccess | None = None,
        rules: Rules | None = None,
        probes: ProbeSet | None = None,
        installer: Any = None,
        is_upgrade: Callable[[], bool] | None = None,
    ) -> None:
        self.cfg = cfg
        # Chosen first: an unusable backend refuses the start before anything is created.
        self.ebpf: EbpfBackend | None = None
        if rules is None:
            selection = select_backend(cfg)
            rules, self.ebpf = selection.rules, selection.ebpf
        self.rules: Rules = rules
        if kube is None:
            from node_agent.kube import KubeApi

            kube = KubeApi(cfg.kubeconfig)
        self.kube = kube
        self._is_upgrade = is_upgrade or self._daemonset_still_present
        if self.rules.name in SERIAL_BACKENDS:
            self.rules = SerialRules(self.rules)
        self.host_probe: HostProbe | None = None
        if probes is None:
            self.host_probe = HostProbe(
                ipv6=cfg.ipv6,
                node_netns=cfg.node_netns,
                snat_v4=cfg.host_probe_snat_ipv4,
                snat_v6=cfg.host_probe_snat_ipv6,
            )
            probes = self.host_probe
        self.probes = probes
        self.installer = installer
        self.metrics = AgentMetrics()
        self.cache = PodCache()
        self.policy = EnablementPolicy(
            excluded_namespaces=cfg.excluded_namespaces, ztunnel_namespace=cfg.system_namespace
        )
        self.ztunnel = ZdsZtunnel(self.cache)
        self.finder = NetnsFinder(cfg.proc_root, cfg.host_netns)
        self.enroller = Enroller(
            self.rules,
            self.ztunnel,
            self.probes,
            self.kube,
            self.cache,
            self.settings_for,
            observer=self.metrics,
        )
        self.pod_informer: Informer[PodInfo] = Informer(
            "pods",
            PodsListWatch(self.kube, cfg.node_name),
            PodInfo.from_json,
            lambda p: p.uid,
            self._on_pod,
        )
        self.ns_informer: Informer[NamespaceInfo] = Informer(
            "namespaces",
            NamespacesListWatch(self.kube),
            NamespaceInfo.from_json,
            lambda n: n.name,
            self._on_namespace,
        )
        self.controller = PodController(
            ambient_enabled=cfg.ambient_enabled,
            policy=self.policy,
            pods=self.pod_informer,
            namespaces=self.ns_informer,
            enroller=self.enroller,
            finder=self.finder,
            cache=self.cache,
            host_netns=cfg.host_netns,
            map_netns_path=cfg.host_netns_path,
            reader=self.kube,
            on_event=lambda kind: self.metrics.reconcile_events.labels(type=kind).inc(),
        )
        self.queue = WorkQueue(self._reconcile, workers=cfg.workers)
        self.controller.queue = self.queue
        self.reconciler = Reconciler(
            pods=self.pod_informer,
            cache=self.cache,
            enroller=self.enroller,
            finder=self.finder,
            host_netns=cfg.host_netns,
            runner=self.queue,
            wants=self.controller.wants,
            period=cfg.reconcile_seconds,
            on_repair=lambda reason: self.metrics.repairs.labels(reason=reason).inc(),
            after_pass=self._prune_pins() if self.ebpf is not None else None,
        )
        self.zds: ZdsServer | None = None
        self.plugin_server = PluginEventServer(
            cfg.plugin_event_socket,
            self.controller.plugin_add,
            self.controller.pod_status,
            on_request=lambda code: self.metrics.plugin_requests.labels(
                response_code=str(code)
            ).inc(),
            log_socket_path=os.path.join(cfg.run_dir, c.PLUGIN_LOG_SOCKET),
        )
        self.health = HealthServer(self.is_ready, cfg.health_port, cfg.listen_address)
        self.state = StateExporter(cfg.state_file, self.snapshot_state)
        self.ready = threading.Event()
        self.started_at = time.time()
        self.health_port = 0
        self.metrics_port = 0
        self._install_seen: dict[str, int] = {}

    # -- wiring helpers -------------------------------------------------------------------
    def _prune_pins(self) -> Callable[[], object]:
        assert self.ebpf is not None
        pruner = PinPruner(
            self.ebpf,
            self.cfg.proc_root,
            self.cfg.netns_dir,
            held=lambda: [e.netns_inode for e in self.cache.entries()],
        )
        return pruner.run

    def _daemonset_still_present(self) -> bool:
        from install.teardown import is_upgrade

        return is_upgrade(self.cfg.pod_namespace)

    def settings_for(self, pod: PodInfo) -> RedirectSettings:
        from cni_plugin.enablement import bypass_inbound

        return RedirectSettings(
            dns_capture=self.cfg.dns_capture,
            ipv6=self.cfg.ipv6,
            bypass_inbound=bypass_inbound(pod.annotations),
            probe_snat_ipv4=self.cfg.host_probe_snat_ipv4,
            probe_snat_ipv6=self.cfg.host_probe_snat_ipv6,
        )

    def _on_pod(self, old: PodInfo | None, new: PodInfo | None) -> None:
        self.controller.on_pod(old, new)

    def _on_namespace(self, old: NamespaceInfo | None, new: NamespaceInfo | None) -> None:
        self.controller.on_namespace(old, new)

    def _reconcile(self, uid: str) -> None:
        try:
            self.controller.reconcile(uid)
        finally:
            self.metrics.enrolled_pods.set(
                sum(1 for e in self.cache.entries() if e.state == "enabled")
            )
            self.state.touch()

    def _on_ztunnel(self, connected: bool) -> None:
        self.metrics.ztunnel_connected.set(1 if connected else 0)
        log.info("ztunnel connection changed", extra={"fields": {"connected": connected}})
        if connected:
            # Pods left pending while ztunnel was away: retry them now, not after backoff.
            for e in self.cache.entries():
                if e.state == "pending":
                    self.queue.forget(e.uid)
                    self.queue.add(e.uid)
        self.state.touch()

    def is_ready(self) -> bool:
        installed = self.installer is None or bool(getattr(self.installer, "ready", True))
        return self.ready.is_set() and installed

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, sync_timeout: float = 60.0) -> None:
        cfg = self.cfg
        log.info(
            "agent starting", extra={"fields": {"node": cfg.node_name, "backend": self.rules.name}}
        )
        self.metrics_port = self.metrics.serve(cfg.monitoring_port, cfg.listen_address)
        self.health_port = self.health.start()
        if self.installer is not None:
            self.installer.start()
        if self.host_probe is not None:
            self.host_probe.setup()
        self.ns_informer.start()
        self.pod_informer.start()
        deadline = time.monotonic() + sync_timeout
        for inf in (self.ns_informer, self.pod_informer):
            if not inf.synced.wait(max(0.0, deadline - time.monotonic())):
                raise ConfigError(
                    f"could not sync {inf.name} from the API server within {sync_timeout:g}s: "
                    "check the kubeconfig and that the API server is reachable"
                )
        self.reconciler.adopt_annotated()
        if cfg.reconcile_rules_on_startup:
            self.reconciler.run_pass()
        self.zds = ZdsServer(cfg.ztunnel_socket, self.ztunnel, on_connected_change=self._on_ztunnel)
        self.ztunnel.server = self.zds
        self.zds.start()
        self.plugin_server.start()
        self.state.start()
        self.ready.set()
        self.queue.start()
        self.reconciler.start()
        log.info("agent ready", extra={"fields": {"enrolled": len(self.cache)}})

    def stop(self) -> None:
        """Stop serving; leave every pod's rules, the ipsets and annotations in place."""
        self.ready.clear()
        self.reconciler.stop()
        self.plugin_server.stop()
        self.queue.stop()
        self.pod_informer.stop()
        self.ns_informer.stop()
        if self.zds is not None:
            self.zds.stop()
        self.state.stop()
        self.health.stop()
        self.metrics.stop()
        # Uninstall or upgrade: decided once (SPEC §7, as the installer does) for both the
        # installer's files and the ebpf backend's node-wide objects.
        uninstall = None
        if self.installer is not None or self.ebpf is not None:
            uninstall = not self._is_upgrade()
        if self.installer is not None:
            self.installer.stop(uninstall=uninstall)
        if self.ebpf is not None and uninstall:
            self._uninstall_ebpf()
        if uninstall:
            self._uninstall_host_state()
        self.cache.close()
        log.info("agent stopped; pod rules left in place")

    def _uninstall_host_state(self) -> None:
        """Uninstall: the host probe SNAT rule and its ipsets go, as Istio's agent removes
        them, unless pods are still enrolled (their kubelet probes need the rule: unlabel
        before uninstalling); the state file goes too (nothing reads it any more)."""
        enrolled = len(self.cache)
        if self.host_probe is not None and enrolled:
            log.warning(
                "uninstall: host probe rule and sets kept, pods still enrolled",
                extra={"fields": {"pods": enrolled}},
            )
        elif self.host_probe is not None:
            self.host_probe.teardown()
            log.info("uninstall: host probe rule and sets removed")
        with contextlib.suppress(OSError):
            os.unlink(self.cfg.state_file)

    def _uninstall_ebpf(self) -> None:
        assert self.ebpf is not None
        try:
            removed = self.ebpf.uninstall_node()
        except OSError as e:
            log.warning(
                "could not remove the ebpf node objects", extra={"fields": {"error": str(e)}}
            )
            return
        if removed:
            if self.ebpf.cache_dir:  # the compiled programs serve restarts, not a reinstall
                shutil.rmtree(self.ebpf.cache_dir, ignore_errors=True)
            log.info(
                "uninstall: ebpf node objects removed",
                extra={"fields": {"pin_root": str(self.ebpf.pin_root)}},
            )
        else:
            log.warning(
                "uninstall: ebpf node objects kept, pods still redirected by them",
                extra={"fields": {"pods": len(self.ebpf.pinned_pods())}},
            )

    # -- state export ---------------------------------------------------------------------
    def sync_install_metrics(self) -> None:
        """Mirror the in-process installer's counters into the SPEC metric names. Without an
        in-process installer (``istio-cni-agent install`` runs apart), ready = agent ready."""
        inst = self.installer
        if inst is None:
            self.metrics.install_ready.set(1 if self.ready.is_set() else 0)
            return
        self.metrics.install_ready.set(1 if getattr(inst, "ready", False) else 0)
        totals = dict(getattr(inst, "installs_total", {}) or {})
        for result, n in totals.items():
            delta = int(n) - self._install_seen.get(result, 0)
            if delta > 0:
                self.metrics.installs.labels(result=result).inc(delta)
                self._install_seen[result] = int(n)

    def snapshot_state(self) -> dict[str, Any]:
        self.sync_install_metrics()
        pods = []
        for p in self.pod_informer.items():
            entry = self.cache.get(p.uid)
            d = self.controller.decision(p)
            pods.append(
                {
                    "namespace": p.namespace,
                    "name": p.name,
                    "uid": p.uid,
                    "ips": list(entry.ips if entry and entry.ips else p.ips),
                    "node": p.node_name,
                    "phase": p.phase,
                    "host_network": p.host_network,
                    "state": entry.state if entry else "",
                    "decision": d.name.lower() if self.cfg.ambient_enabled else "ambient_disabled",
                    "annotation": p.redirection_annotation,
                    "netns_inode": entry.netns_inode if entry else None,
                    "zds": entry.zds if entry else "",
                    "last_error": (entry.last_error if entry else "")
                    or self.controller.last_errors.get(p.uid, ""),
                    "bypass_inbound": entry.bypass_inbound if entry else False,
                    "enrolled_at": entry.enrolled_at if entry else 0.0,
                    "latency_ms": round(entry.latency_s * 1000, 2) if entry else None,
                    "steps_ms": entry.steps_ms if entry else {},
                    "check": self.reconciler.checks.get(p.uid),
                }
            )
        return {
            "node": self.cfg.node_name,
            "backend": self.rules.name,
            "dns_capture": self.cfg.dns_capture,
            "ipv6": self.cfg.ipv6,
            "ready": self.ready.is_set(),
            "ztunnel_connected": self.ztunnel.connected,
            "started_at": self.started_at,
            "informers": {
                i.name: {"relists": i.relists, "errors": i.errors, "synced": i.synced.is_set()}
                for i in (self.pod_informer, self.ns_informer)
            },
            "pods": pods,
        }


# -- command line ---------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--node-name", help="this node's name (env NODE_NAME)")
    a("--kubeconfig", help="kubeconfig file (env KUBECONFIG; default in-cluster)")
    a("--run-dir", dest="run_dir", help="agent run dir (env CNI_AGENT_RUN_DIR)")
    a("--ztunnel-socket", dest="ztunnel_socket", help="ZDS socket (env ZTUNNEL_UDS_ADDRESS)")
    a("--proc-root", dest="proc_root", help="host /proc mount (env HOST_PROC, /host/proc)")
    a("--netns-dir", dest="netns_dir", help="host /var/run/netns mount (env HOST_NETNS_DIR)")
    a("--host-netns", dest="host_netns", help="path of the host/node netns reference")
    a("--node-netns", dest="node_netns", help="netns for host probe rules (default: own)")
    a("--backend", choices=("iptables", "nftables", "ebpf"), help="redirection backend")
    a("--health-port", dest="health_port", type=int, help="health port (default 8000)")
    a("--monitoring-port", dest="monitoring_port", type=int, help="metrics port (15014)")
    a("--listen-address", dest="listen_address", help="address for health/metrics")
    a("--reconcile-seconds", dest="reconcile_seconds", type=float, help="drift check period")
    a("--workers", type=int, help="parallel enrollment workers (default 8)")
    a(
        "--install",
        dest="install_cni",
        action="store_true",
        default=None,
        help="run the CNI installer in-process (as Istio's agent does)",
    )
    a("--log-level", dest="log_level", help="debug, info, warning, error")


def run(args: argparse.Namespace) -> int:
    env_cfg = AgentConfig.from_env(
        {**os.environ, **({"NODE_NAME": args.node_name} if args.node_name else {})}
    )
    fields = [
        "kubeconfig", "run_dir", "ztunnel_socket", "proc_root", "netns_dir", "host_netns",
        "node_netns", "backend", "health_port", "monitoring_port", "listen_address",
        "reconcile_seconds", "workers", "install_cni", "log_level",
    ]  # fmt: skip
    cfg = env_cfg.with_overrides(**{f: getattr(args, f, None) for f in fields})
    logs.configure(cfg.log_level)
    log.debug(cap_malloc_arenas())  # before any thread exists
    installer = _make_installer(cfg) if cfg.install_cni else None
    agent = Agent(cfg, installer=installer)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        agent.start()
    except IstioCniError:
        agent.stop()
        raise
    stop.wait()
    agent.stop()
    return 0


def _make_installer(cfg: AgentConfig) -> Any:
    """Istio's agent runs the installer in-process; ours does when INSTALL_CNI/--install
    says so. The installer reads its own (Istio-named) environment."""
    try:
        from install.installer import Installer
    except ImportError as e:
        raise ConfigError(f"--install given but the installer is not available: {e}") from None
    return Installer()
