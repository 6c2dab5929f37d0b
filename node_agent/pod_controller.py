"""Deciding, for one pod at a time, whether it should be in the mesh, and making it so.

Level-triggered: informer events only enqueue the pod's UID; :meth:`PodController.reconcile`
(the work-queue handler) reads the latest pod and namespace from the informer stores and the
agent's cache, then adds, removes or does nothing. So repeated, coalesced or out-of-order
events are harmless, and ADD/DEL are idempotent. The plugin's ``cmdadd`` (a new sandbox)
goes through :meth:`PodController.plugin_add` under the same per-pod serialisation.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

from cni_plugin import constants as c
from cni_plugin.enablement import Decision, EnablementPolicy, bypass_inbound, decide
from cni_plugin.errors import IstioCniError, NetnsError, NotRetryableError
from cni_plugin.netns import Netns
from node_agent.enrollment import Enroller
from node_agent.logs import PodLogger
from node_agent.netns_finder import FoundNetns
from node_agent.pod_cache import PodCache, PodState
from node_agent.resources import NamespaceInfo, PodInfo
from node_agent.state import PodRecord, RuleCheck

log = logging.getLogger("node_agent.controller")

T_co = TypeVar("T_co", covariant=True)


class Store(Protocol[T_co]):
    """An informer's cache of one kind (the real one is :class:`node_agent.informers.Informer`)."""

    def get(self, key: str) -> T_co | None: ...

    def items(self) -> Sequence[T_co]: ...


class PodReader(Protocol):
    def get_pod(self, namespace: str, name: str) -> dict[str, Any] | None: ...


class NetnsLookup(Protocol):
    """Finds a running pod's namespace (the real one is :class:`NetnsFinder`)."""

    proc_root: str

    def find(self, uid: str) -> FoundNetns | None: ...


class NetnsOpener(Protocol):
    """Opens an existing namespace, never the host's, never creating one (the real one is
    :class:`node_agent.netns_finder.HostCheckedOpener`)."""

    def open(self, path: str) -> Netns: ...


# How long our own annotation patch may take to show up in the informer's copy of the pod.
ANNOTATION_LAG_S = 5.0


class Enqueuer(Protocol):
    def add(self, key: str) -> None: ...

    def add_after(self, key: str, delay: float) -> None: ...

    def forget(self, key: str) -> None: ...

    def run_exclusive(self, key: str, work: Callable[[], Any]) -> Any: ...


class RetryLater(IstioCniError):
    """The pod cannot be handled yet (e.g. its namespace is not visible in /proc yet)."""


@dataclass(frozen=True)
class PluginAdd:
    """One ``POST /cmdadd`` body (SPEC §3), parsed."""

    netns: str
    pod_name: str
    pod_namespace: str
    ips: tuple[str, ...]


class PodController:
    def __init__(
        self,
        *,
        ambient_enabled: bool,
        policy: EnablementPolicy,
        pods: Store[PodInfo],
        namespaces: Store[NamespaceInfo],
        enroller: Enroller,
        finder: NetnsLookup,
        opener: NetnsOpener,
        cache: PodCache,
        queue: Enqueuer,
        map_netns_path: Callable[[str], str] = lambda p: p,
        reader: PodReader | None = None,
        on_event: Callable[[str], None] = lambda kind: None,
        on_settled: Callable[[], None] = lambda: None,
    ) -> None:
        self.ambient_enabled = ambient_enabled
        self.policy = policy
        self.pods = pods
        self.namespaces = namespaces
        self.enroller = enroller
        self.finder = finder
        self.opener = opener
        self.cache = cache
        self.queue = queue
        self.map_netns_path = map_netns_path
        self.reader = reader
        self.on_event = on_event
        self.on_settled = on_settled  # after every reconcile (gauges, state file)
        self._tombstones: dict[str, PodInfo] = {}
        self._lock = threading.Lock()
        self.last_errors: dict[str, str] = {}

    # -- informer handlers (quick: enqueue only) ------------------------------------------
    def on_pod(self, old: PodInfo | None, new: PodInfo | None) -> None:
        self.on_event("add" if old is None else "delete" if new is None else "update")
        if new is None and old is not None:
            with self._lock:
                self._tombstones[old.uid] = old
        pod = new or old
        if pod is not None:
            self.queue.add(pod.uid)

    def on_namespace(self, old: NamespaceInfo | None, new: NamespaceInfo | None) -> None:
        before = (old.labels if old else {}).get(c.DATAPLANE_MODE_LABEL)
        after = (new.labels if new else {}).get(c.DATAPLANE_MODE_LABEL)
        if before == after:
            return
        name = (new or old).name  # type: ignore[union-attr]
        self.on_event("namespace")
        for pod in self.pods.items():
            if pod.namespace == name:
                self.queue.add(pod.uid)

    # -- decisions ------------------------------------------------------------------------
    def decision(self, pod: PodInfo) -> Decision:
        return decide(pod.facts(self.namespaces.get(pod.namespace)), self.policy)

    def wants(self, pod: PodInfo) -> bool:
        return self.ambient_enabled and self.decision(pod).enabled

    def reconcile(self, uid: str) -> None:
        """Work-queue handler for one pod UID; raises to be retried with backoff, except
        :class:`NotRetryableError` (in-pod rules could not be installed), which the queue
        does not retry: the next event for the pod tries again. That is what Istio's agent
        does with ``ErrNonRetryableAdd`` (cni/pkg/nodeagent: the informer handler logs
        "will not retry" and drops the event; the pod is neither annotated nor put in the
        probe set). Ours records the error for ``istio-cni-agent pod`` and counts it."""
        try:
            self._reconcile(uid)
        finally:
            self.on_settled()

    def _reconcile(self, uid: str) -> None:
        pod: PodInfo | None = self.pods.get(uid)
        if pod is None:
            with self._lock:
                tomb = self._tombstones.pop(uid, None)
            if tomb is not None and (uid in self.cache or tomb.redirection_annotation):
                self.enroller.remove(tomb, exists=False)
            self._done(uid)
            return
        if pod.terminal:
            if uid in self.cache or pod.redirection_annotation:
                # The sandbox is gone or going: no rules to remove, but tell ztunnel and
                # clear the annotation.
                self.enroller.remove(pod, exists=False)
                if pod.redirection_annotation:
                    self.enroller.clear_annotation(pod)
            self._done(uid)
            return
        entry = self.cache.get(uid)
        if not self.wants(pod):
            if entry is not None or pod.redirection_annotation is not None:
                self.enroller.remove(pod, exists=True)
            self._done(uid)
            return
        if not pod.ips:
            return  # no sandbox network yet: an update with the IP will come
        if (
            entry is not None
            and entry.state == PodState.ENABLED
            and entry.netns is not None
            and entry.bypass_inbound == bypass_inbound(pod.annotations)
        ):
            if pod.redirection_annotation == c.REDIRECTION_ENABLED:
                self._done(uid)
                return  # already enrolled: nothing to do (the reconciler checks drift)
            lag = time.monotonic() - entry.annotated_at
            if lag < ANNOTATION_LAG_S:
                # An event older than our own patch (the informer has not seen it yet):
                # enrolling again would only repeat work. Look again once it must be there;
                # if the annotation is still missing then (removed by someone), re-add.
                self.queue.add_after(uid, ANNOTATION_LAG_S - lag)
                return
        # New, pending, failed, annotation lost, or the bypass-inbound annotation toggled
        # (the rules variant changes): (re-)add, idempotently.
        netns = self._netns_for(pod)
        try:
            self.enroller.add(pod, netns)
        except NotRetryableError as e:
            self.last_errors[uid] = str(e)
            PodLogger(log, pod.namespace, pod.name, pod.uid).error(
                "cannot capture pod, will not retry until the pod changes",
                extra={"fields": {"error": str(e)}},
            )
            raise
        except IstioCniError as e:
            self.last_errors[uid] = str(e)
            raise
        self._done(uid)

    def _done(self, uid: str) -> None:
        self.last_errors.pop(uid, None)
        self.queue.forget(uid)

    def ztunnel_changed(self, connected: bool) -> None:
        """Pods left pending while ztunnel was away are retried as it connects, not after
        their backoff."""
        log.info("ztunnel connection changed", extra={"fields": {"connected": connected}})
        if not connected:
            return
        for e in self.cache.entries():
            if e.state == PodState.PENDING:
                self.queue.forget(e.uid)
                self.queue.add(e.uid)

    def _netns_for(self, pod: PodInfo) -> Netns:
        entry = self.cache.get(pod.uid)
        if entry is not None and entry.netns is not None and entry.netns.fd >= 0:
            return entry.netns
        found = self.finder.find(pod.uid)
        if found is None:
            raise RetryLater(
                f"no process of pod {pod.key} found under {self.finder.proc_root}: its sandbox "
                "may still be starting; will retry"
            )
        try:
            return self.opener.open(found.path)
        except NetnsError as e:
            raise RetryLater(str(e)) from None

    # -- plugin path ----------------------------------------------------------------------
    def plugin_add(self, event: PluginAdd) -> str:
        """Enroll a pod whose sandbox the CNI plugin is creating; returns a reply message.
        Raises :class:`IstioCniError` (the plugin then fails the ADD, fail-closed)."""
        t0 = time.monotonic()
        pod = self._find_pod(event.pod_namespace, event.pod_name)
        if pod is None:
            raise IstioCniError(
                f"pod {event.pod_namespace}/{event.pod_name} not found in the API: cannot "
                "enroll it (the runtime will retry the sandbox)"
            )
        decision = self.decision(pod)
        if not (self.ambient_enabled and decision.enabled):
            return f"not enrolled: {decision.value}"
        pod = replace(pod, ips=event.ips or pod.ips)
        plog = PodLogger(log, pod.namespace, pod.name, pod.uid)
        plog.info("plugin asked to enroll pod", extra={"fields": {"netns": event.netns}})
        path = self.map_netns_path(event.netns)

        def work() -> str:
            netns = self.opener.open(path)
            entry = self.cache.get(pod.uid)
            if (
                entry is not None
                and entry.state == PodState.ENABLED
                and entry.netns is not None
                and entry.netns.ident == netns.ident
            ):
                netns.close()
                return "already enrolled"
            self.enroller.add(pod, netns, started=t0)
            return "enrolled"

        result: str = self.queue.run_exclusive(pod.uid, work)
        return result

    def _find_pod(self, namespace: str, name: str) -> PodInfo | None:
        for p in self.pods.items():
            if p.namespace == namespace and p.name == name and not p.terminal:
                return p
        if self.reader is None:
            return None
        raw = self.reader.get_pod(namespace, name)
        return PodInfo.from_json(raw) if raw is not None else None

    def pod_status(self, namespace: str, name: str) -> Mapping[str, Any]:
        """For ``GET /pod``: whether the agent considers the pod ambient, from its caches."""
        for p in self.pods.items():
            if p.namespace == namespace and p.name == name:
                d = self.decision(p)
                entry = self.cache.get(p.uid)
                return {
                    "known": True,
                    "uid": p.uid,
                    "ambient": self.ambient_enabled and d.enabled,
                    "reason": d.value,
                    "state": entry.state if entry else "",
                }
        return {"known": False, "ambient": False, "reason": "pod not in the agent's cache"}

    # -- state file -----------------------------------------------------------------------
    def records(self, checks: Mapping[str, RuleCheck]) -> list[PodRecord]:
        """Every pod of this node as the state file shows it (``checks``: the reconciler's)."""
        out = []
        for p in self.pods.items():
            entry = self.cache.get(p.uid)
            decision = self.decision(p).name.lower() if self.ambient_enabled else "ambient_disabled"
            out.append(
                PodRecord(
                    namespace=p.namespace,
                    name=p.name,
                    uid=p.uid,
                    ips=entry.ips if entry and entry.ips else p.ips,
                    node=p.node_name,
                    phase=p.phase,
                    host_network=p.host_network,
                    state=entry.state if entry else "",
                    decision=decision,
                    annotation=p.redirection_annotation,
                    netns_inode=entry.netns_inode if entry else None,
                    zds=entry.zds if entry else "",
                    last_error=(entry.last_error if entry else "")
                    or self.last_errors.get(p.uid, ""),
                    bypass_inbound=entry.bypass_inbound if entry else False,
                    enrolled_at=entry.enrolled_at if entry else 0.0,
                    latency_ms=round(entry.latency_s * 1000, 2) if entry else None,
                    steps_ms=entry.steps_ms if entry else {},
                    check=checks.get(p.uid),
                )
            )
        return out
