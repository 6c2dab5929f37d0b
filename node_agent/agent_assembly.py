"""The node agent's composition root: builds the real parts once, in dependency order, and
starts and stops them in the SPEC §4 order. It decides nothing about pods or backends.

Start order: metrics and health (not ready) -> installer (when configured) -> host probe
set and rule, backend node setup -> informers, wait for cache sync (for as long as it
takes: fail closed, the plugin stays installed) -> adopt pods already annotated
``enabled`` (rebuild the ZDS snapshot, namespaces found again via /proc; their probe
addresses synced into the host probe set) -> check their rules (startup reconcile) -> ZDS
server (accept ztunnel) -> plugin-event server -> ready -> process the queue, periodic
reconcile (each pass also repairs the host probe rule and set). Stop undoes the servers
only: in-pod rules, ipsets and annotations stay, so a restart does not touch a single
pod's traffic; on an uninstall (decided once and first, SPEC §7, only on a positive answer:
:mod:`install.teardown`) the installer's files, the host probe rule and sets and the
backend's node-wide state go too. The node namespace and its IPv6 support are settled
before anything is built (:mod:`node_agent.node_namespace`).

Edges may be injected (tests): ``kube``, ``rules`` (then no node-wide backend state),
``probes`` (then no host probe rule is set up), ``installer`` and ``is_upgrade``. Parts
that call each other both ways (informers and controller, queue and controller, ZDS server
and controller) are joined by closures over this object: every part is complete when
constructed, nothing is assigned into another part afterwards.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Protocol

from cni_plugin import constants as c
from cni_plugin.enablement import EnablementPolicy
from cni_plugin.errors import ConfigError, IstioCniError, NotRetryableError
from install.teardown import StopQuestion
from node_agent.adapters import (
    CacheSnapshot,
    KubeAccess,
    NamespacesListWatch,
    PodsListWatch,
    ZdsZtunnel,
)
from node_agent.add_admission import AddAdmission, NamespaceAddresses
from node_agent.backend_selection import HostProbeRules, Selection, select_backend
from node_agent.config import AgentConfig
from node_agent.departure import EbpfDeparture, NetfilterDeparture
from node_agent.enrollment import Enroller, ProbeSet, Rules
from node_agent.health import HealthServer
from node_agent.informers import Informer
from node_agent.metrics import AgentMetrics, InstallerStatus
from node_agent.nat_hold import NatHold
from node_agent.netns_finder import HostCheckedOpener, NetnsFinder
from node_agent.node_namespace import ipv6_unusable, node_namespace
from node_agent.plugin_events import PluginEventServer
from node_agent.pod_cache import PodCache, PodState
from node_agent.pod_controller import PodController
from node_agent.reconciler import CHECKED_STATES, Reconciler
from node_agent.resources import NamespaceInfo, PodInfo
from node_agent.state import InformerRecord, StateExporter, StateSources
from node_agent.work_queue import WorkQueue
from node_agent.zds_server import ZdsServer

log = logging.getLogger("node_agent.agent")


class InProcessInstaller(InstallerStatus, Protocol):
    """The CNI installer run inside the agent (:class:`install.installer.Installer`)."""

    def start(self) -> None: ...

    def stop(self, *, uninstall: bool | None = None) -> None: ...


def make_installer() -> InProcessInstaller:
    """Istio's agent runs the installer in-process; ours does when INSTALL_CNI/--install
    says so. The installer reads its own (Istio-named) environment."""
    try:
        from install.installer import Installer
    except ImportError as e:
        raise ConfigError(f"--install given but the installer is not available: {e}") from None
    return Installer()


class Agent:
    """The wired agent. Edges may be injected (tests); defaults are the real ones."""

    def __init__(
        self,
        cfg: AgentConfig,
        *,
        kube: KubeAccess | None = None,
        rules: Rules | None = None,
        probes: ProbeSet | None = None,
        installer: InProcessInstaller | None = None,
        is_upgrade: Callable[[], bool] | None = None,
    ) -> None:
        cfg = replace(cfg, node_netns=node_namespace(cfg.node_netns))
        if cfg.ipv6 and (reason := ipv6_unusable(cfg.node_netns)) is not None:
            log.warning(
                "IPv6 unavailable on this node: running IPv4 only (AMBIENT_IPV6 ignored)",
                extra={"fields": {"reason": reason}},
            )
            cfg = replace(cfg, ipv6=False)
        self.cfg = cfg
        # Chosen first: an unusable backend refuses the start before anything is created.
        self.selection = (
            select_backend(cfg)
            if rules is None
            else Selection(rules, host_probe="nftables" if cfg.native_nftables else "iptables")
        )
        self.rules = self.selection.pod_rules()
        if kube is None:
            from node_agent.kube import KubeApi

            kube = KubeApi(cfg.kubeconfig)
        self.kube = kube
        self._stop_question: StopQuestion | None = None
        if is_upgrade is None:
            self._stop_question = StopQuestion(
                cfg.pod_namespace, cfg.node_name, disable_safe_upgrade=cfg.disable_safe_upgrade
            )
            is_upgrade = self._stop_question
        self._is_upgrade = is_upgrade
        self.host_probe: HostProbeRules | None = None
        if probes is None:
            # iptables/ipset, or nftables with NATIVE_NFTABLES (kubelet's UID read now).
            self.host_probe = self.selection.host_probe_rules(cfg)
            probes = self.host_probe
        self.probes = probes
        if installer is None and cfg.install_cni:
            installer = make_installer()
        self.installer = installer
        self.metrics = AgentMetrics()
        self.cache = PodCache()
        self.node = self.selection.node_lifecycle(
            cfg.proc_root, cfg.netns_dir, held=lambda: [e.netns_inode for e in self.cache.entries()]
        )
        self.zds = ZdsServer(
            cfg.ztunnel_socket,
            CacheSnapshot(self.cache),
            on_connected_change=self._ztunnel,
            peer_uid=cfg.ztunnel_uid,
        )
        self.ztunnel = ZdsZtunnel(self.zds)
        # The netfilter backends redirect with conntrack NAT, which a NAT hold protects;
        # ebpf steers new connections only and carries captured ones in its own map.
        nat: NatHold | None = None
        departure: NetfilterDeparture | EbpfDeparture | None = None
        if self.rules.name in ("iptables", "nftables"):
            nat = NatHold()
            departure = NetfilterDeparture(self.rules, nat)
        elif self.rules.name == "ebpf":
            departure = EbpfDeparture(self.rules)
        self.metrics.count_ztunnel_connections(lambda: self.zds.connection_count)
        self.enroller = Enroller(
            self.rules,
            self.ztunnel,
            self.probes,
            self.kube,
            self.cache,
            cfg.settings_for,
            observer=self.metrics,
            nat=nat,
            departure=departure,
        )
        self.pod_informer: Informer[PodInfo] = Informer(
            "pods",
            PodsListWatch(self.kube, cfg.node_name),
            PodInfo.from_json,
            lambda p: p.uid,
            lambda old, new: self.controller.on_pod(old, new),
            interrupt=self.kube.interrupt_watches,
        )
        self.ns_informer: Informer[NamespaceInfo] = Informer(
            "namespaces",
            NamespacesListWatch(self.kube),
            NamespaceInfo.from_json,
            lambda n: n.name,
            lambda old, new: self.controller.on_namespace(old, new),
            interrupt=self.kube.interrupt_watches,
        )
        self.queue = WorkQueue(
            lambda uid: self.controller.reconcile(uid),
            workers=cfg.workers,
            on_not_retryable=self._not_retried,
        )
        finder = NetnsFinder(cfg.proc_root, cfg.host_netns)
        opener = HostCheckedOpener(cfg.host_netns)
        self.controller = PodController(
            ambient_enabled=cfg.ambient_enabled,
            policy=EnablementPolicy(
                excluded_namespaces=cfg.excluded_namespaces,
                ztunnel_namespace=cfg.system_namespace,
                selectors=cfg.enablement_selectors,
            ),
            pods=self.pod_informer,
            namespaces=self.ns_informer,
            enroller=self.enroller,
            finder=finder,
            opener=opener,
            cache=self.cache,
            queue=self.queue,
            map_netns_path=cfg.host_netns_path,
            reader=self.kube,
            on_event=lambda kind: self.metrics.reconcile_events.labels(type=kind).inc(),
            on_settled=self._settled,
            admission=AddAdmission(cfg.node_name, finder, NamespaceAddresses()),
        )
        self.reconciler = Reconciler(
            pods=self.pod_informer,
            cache=self.cache,
            enroller=self.enroller,
            finder=finder,
            opener=opener,
            runner=self.queue,
            wants=self.controller.wants,
            period=cfg.reconcile_seconds,
            on_repair=lambda reason: self.metrics.repairs.labels(reason=reason).inc(),
            after_pass=self._housekeeping,
        )
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
        self.ready = threading.Event()
        self.started_at = time.time()
        self.state = StateExporter(
            cfg.state_file,
            StateSources(
                node=cfg.node_name,
                backend=self.rules.name,
                dns_capture=cfg.dns_capture,
                ipv6=cfg.ipv6,
                started_at=self.started_at,
                ready=self.ready.is_set,
                ztunnel_connected=lambda: self.ztunnel.connected,
                pods=lambda: self.controller.records(self.reconciler.checks),
                informers=self._informer_records,
                before_write=lambda: self.metrics.mirror_installer(
                    self.installer, self.ready.is_set()
                ),
            ).collect,
        )
        self.health_port = 0
        self.metrics_port = 0

    # -- joins between parts (observers only: the decisions are the parts') -------------
    def _settled(self) -> None:
        self.metrics.enrolled_pods.set(self.cache.count(PodState.ENABLED))
        self.state.touch()

    def _ztunnel(self, connected: bool) -> None:
        self.controller.ztunnel_changed(connected)
        self.state.touch()

    def _not_retried(self, uid: str, error: NotRetryableError) -> None:
        self.metrics.not_retried.inc()
        self.state.touch()

    def _informer_records(self) -> dict[str, InformerRecord]:
        return {
            i.name: InformerRecord(relists=i.relists, errors=i.errors, synced=i.synced.is_set())
            for i in (self.pod_informer, self.ns_informer)
        }

    def is_ready(self) -> bool:
        return self.ready.is_set() and (self.installer is None or self.installer.ready)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, sync_timeout: float = 60.0, cancel: threading.Event | None = None) -> bool:
        """Start every part; True once ready, False when ``cancel`` was set first.

        An API server that cannot be listed does not fail the start: the agent keeps
        retrying (not ready, one warning every ``sync_timeout``) with the plugin installed,
        so new pods wait for it (fail closed) instead of the node losing the plugin."""
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
        self.node.setup()
        self.ns_informer.start()
        self.pod_informer.start()
        if self._stop_question is not None:
            self._stop_question.prepare()
        if not self._wait_synced(sync_timeout, cancel):
            return False
        self.reconciler.adopt_annotated()
        self._sync_probes()
        if cfg.reconcile_rules_on_startup:
            self.reconciler.run_pass(parallel=cfg.workers, upkeep=False)
        self.zds.start()
        self.plugin_server.start()
        self.state.start()
        self.ready.set()
        self.queue.start()
        self.reconciler.start()
        log.info("agent ready", extra={"fields": {"enrolled": len(self.cache)}})
        return True

    def _wait_synced(self, warn_every: float, cancel: threading.Event | None) -> bool:
        t0 = time.monotonic()
        warn_at = t0 + warn_every
        for inf in (self.ns_informer, self.pod_informer):
            while not inf.synced.wait(0.1):
                if cancel is not None and cancel.is_set():
                    return False
                if time.monotonic() >= warn_at:
                    warn_at += warn_every
                    log.warning(
                        "cannot sync from the API server yet, still trying (not ready; the "
                        "plugin stays installed, so new pods wait): check the kubeconfig and "
                        "that the API server is reachable",
                        extra={
                            "fields": {
                                "resource": inf.name,
                                "waited_s": round(time.monotonic() - t0),
                            }
                        },
                    )
        return True

    def _sync_probes(self) -> None:
        """The host probe set holds exactly the enrolled pods' IPs: adopted pods' re-added
        (a node restart empties it), pods gone pruned. One batch, whatever the pod count."""
        if self.host_probe is None:
            return
        enrolled = {e.uid: e.ips for e in self.cache.entries() if e.state in CHECKED_STATES}
        known = {ip for e in self.cache.entries() for ip in e.ips}
        self.host_probe.sync(enrolled, keep=known)

    def _housekeeping(self) -> None:
        """After each reconcile pass: the backend's node-wide upkeep, the host probe rule
        (first in POSTROUTING) and set repaired."""
        try:
            self.node.housekeeping()
        finally:
            if self.host_probe is not None:
                self.host_probe.ensure()
                self._sync_probes()

    def _uninstall_host_state(self) -> None:
        """Uninstall: the host probe SNAT rule and its ipsets go, as Istio's agent removes
        them, unless pods are still enrolled (their kubelet probes need the rule: unlabel
        before uninstalling). The state file goes at the end of :meth:`stop`, once its
        writer has stopped (a last write would bring it back)."""
        # Pods whose kubelet probes go through the SNAT rule: the ones in the probe set.
        enrolled = sum(1 for e in self.cache.entries() if e.state in CHECKED_STATES)
        if self.host_probe is not None and enrolled:
            log.warning(
                "uninstall: host probe rule and sets kept, pods still enrolled",
                extra={"fields": {"pods": enrolled}},
            )
        elif self.host_probe is not None:
            try:
                self.host_probe.teardown()
            except (OSError, IstioCniError) as e:  # a missing tool: say so, go on
                log.warning(
                    "uninstall: host probe rules not fully removed",
                    extra={"fields": {"error": str(e)}},
                )

    def stop(self, *, uninstall: bool | None = None) -> None:
        """Stop serving; leave every pod's rules, the ipsets and annotations in place,
        unless this is an uninstall from this node.

        Uninstall or upgrade is decided once (SPEC §7; ``uninstall`` given = decided by the
        caller: False after a failed start, which is never an uninstall) and first, before
        any join: the plugin and conflist entry go and the host probe rule and sets are
        removed while the rest is still stopping, so all of it fits the pod's grace period
        even with enrolments in flight (writes to the probe set after that are refused)."""
        self.ready.clear()
        self.plugin_server.stop()
        if uninstall is None:
            uninstalling = functools.cache(lambda: not self._is_upgrade())
        else:
            uninstalling = functools.cache(lambda: bool(uninstall))
        cleaned = False
        if (self.installer is not None or self.host_probe is not None) and uninstalling():
            if self.installer is not None:
                self.installer.stop(uninstall=True)
            self._uninstall_host_state()
            cleaned = True
            log.info("uninstall: plugin and conflist entry removed, host state released")
        self.reconciler.stop()
        self.queue.stop()
        self.pod_informer.stop()
        self.ns_informer.stop()
        self.zds.stop()
        self.state.stop()
        if cleaned:  # nothing reads it any more; its writer is stopped
            with contextlib.suppress(OSError):
                os.unlink(self.cfg.state_file)
        self.health.stop()
        self.metrics.stop()
        if self.installer is not None and not cleaned:
            self.installer.stop(uninstall=False)
        self.node.teardown(uninstalling)
        self.cache.close()
        log.info("agent stopped" if cleaned else "agent stopped; pod rules left in place")
