"""Adding a pod to the mesh and removing it, in the SPEC §4 order (1.25+ semantics).

Add, for a pod with an open namespace handle:
  1. install in-pod rules (backend ``apply``, idempotent). Failure: this attempt stops
     here (:class:`NotRetryableError`), nothing is cached, nothing is annotated; the work
     queue does not retry it (as Istio's ``ErrNonRetryableAdd``), the next event may.
  2. ZDS Add to ztunnel with the namespace fd. Failure: the pod is cached as ``pending``
     (so the next ztunnel snapshot carries it), annotated ``pending``, and the error is
     raised so the caller retries later.
  3. add the pod IPs to the host probe ipset.
  4. annotate ``ambient.istio.io/redirection: enabled`` (skipped when already so).
Remove: probe set, cache, rules (only while the pod still exists: a deleted pod's
namespace is gone with it), ZDS Del on every connection, annotation null (404 ignored).
Every edge is a Protocol declared here; :mod:`node_agent.agent_assembly` builds the real ones.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

from cni_plugin import constants as c
from cni_plugin.errors import (
    IstioCniError,
    NetnsError,
    NotRetryableError,
    ZtunnelRejectedError,
    ZtunnelUnavailableError,
)
from cni_plugin.netns import Netns
from cni_plugin.redirection.backend import CheckReport, PodRedirection
from cni_plugin.redirection.settings import RedirectSettings
from node_agent.logs import PodLogger
from node_agent.pod_cache import CachedPod, PodCache, PodState, ZdsState
from node_agent.resources import PodInfo

log = logging.getLogger("node_agent.enrollment")


# The in-pod half of a redirection backend is all enrollment calls.
Rules = PodRedirection


class Ztunnel(Protocol):
    """The ZDS server as enrollment sees it."""

    @property
    def connected(self) -> bool: ...

    def add_pod(self, pod: CachedPod, netns_path: str) -> None: ...

    def delete(self, uid: str) -> None: ...


class ProbeSet(Protocol):
    """Host-side set of enrolled pod IPs that kubelet probes are SNATed to."""

    def add(self, uid: str, ips: tuple[str, ...]) -> None: ...

    def remove(self, uid: str, ips: tuple[str, ...]) -> None: ...


class Annotator(Protocol):
    def patch_redirection(self, namespace: str, name: str, value: str | None) -> bool: ...


class EnrollmentObserver(Protocol):
    def enrolled(self, latency_s: float) -> None: ...

    def removed(self) -> None: ...


class Enroller:
    def __init__(
        self,
        rules: Rules,
        ztunnel: Ztunnel,
        probes: ProbeSet,
        annotator: Annotator,
        cache: PodCache,
        settings_for: Callable[[PodInfo], RedirectSettings],
        observer: EnrollmentObserver | None = None,
    ) -> None:
        self.rules = rules
        self.ztunnel = ztunnel
        self.probes = probes
        self.annotator = annotator
        self.cache = cache
        self.settings_for = settings_for
        self.observer = observer

    def add(self, pod: PodInfo, netns: Netns, *, started: float | None = None) -> CachedPod:
        """Enroll ``pod`` whose namespace is ``netns`` (ownership passes to the cache)."""
        t0 = started if started is not None else time.monotonic()
        plog = PodLogger(log, pod.namespace, pod.name, pod.uid)
        settings = self.settings_for(pod)
        prev = self.cache.get(pod.uid)
        entry = CachedPod(
            uid=pod.uid,
            namespace=pod.namespace,
            name=pod.name,
            service_account=pod.service_account,
            ips=pod.ips,
            netns=netns,
            backend=self.rules.name,
            bypass_inbound=settings.bypass_inbound,
        )
        path = entry.netns_path
        assert path is not None
        steps = entry.steps_ms
        mark = time.monotonic()

        def step(name: str) -> None:
            nonlocal mark
            now = time.monotonic()
            steps[name] = round((now - mark) * 1000, 2)
            mark = now

        step("queued")
        # 1. rules
        try:
            self.rules.apply(path, settings)
        except IstioCniError as e:
            if prev is not None and prev.netns is netns:
                prev.state, prev.last_error = PodState.FAILED, str(e)
            else:
                netns.close()
            plog.warning("cannot install redirection rules", extra={"fields": {"error": str(e)}})
            raise NotRetryableError(f"installing redirection for {pod.key} failed: {e}") from e
        step("rules")
        self.cache.put(entry)
        # 2. ztunnel
        try:
            self.ztunnel.add_pod(entry, path)
        except (ZtunnelUnavailableError, ZtunnelRejectedError) as e:
            entry.state, entry.zds, entry.last_error = PodState.PENDING, ZdsState.PENDING, str(e)
            plog.warning("ztunnel did not take the pod yet", extra={"fields": {"error": str(e)}})
            if pod.redirection_annotation != c.REDIRECTION_PENDING:
                self.annotator.patch_redirection(pod.namespace, pod.name, c.REDIRECTION_PENDING)
            raise
        entry.zds = ZdsState.ACKED
        step("ztunnel")
        # 3. probe set
        self.probes.add(pod.uid, pod.ips)
        step("probe_set")
        # 4. annotation
        if pod.redirection_annotation != c.REDIRECTION_ENABLED:
            self.annotator.patch_redirection(pod.namespace, pod.name, c.REDIRECTION_ENABLED)
            entry.annotated_at = time.monotonic()
        step("annotate")
        entry.state, entry.last_error = PodState.ENABLED, ""
        entry.enrolled_at = time.time()
        entry.latency_s = time.monotonic() - t0
        entry.updated = time.time()
        if self.observer is not None:
            self.observer.enrolled(entry.latency_s)
        plog.info(
            "pod enrolled",
            extra={
                "fields": {
                    "netns_inode": entry.netns_inode,
                    "latency_ms": round(entry.latency_s * 1000, 1),
                }
            },
        )
        return entry

    def adopt(self, pod: PodInfo, netns: Netns | None) -> CachedPod:
        """Record an already-enrolled pod found at startup (rules assumed in place; the
        reconciler checks them). ``netns`` None = not found: ztunnel gets a Keep."""
        settings = self.settings_for(pod)
        entry = CachedPod(
            uid=pod.uid,
            namespace=pod.namespace,
            name=pod.name,
            service_account=pod.service_account,
            ips=pod.ips,
            netns=netns,
            state=PodState.ENABLED,
            zds=ZdsState.KEEP if netns is None else ZdsState.SNAPSHOT,
            backend=self.rules.name,
            bypass_inbound=settings.bypass_inbound,
            enrolled_at=time.time(),
        )
        self.cache.put(entry)
        return entry

    def check_rules(self, pod: PodInfo, netns_path: str) -> CheckReport:
        """Whether ``pod``'s in-pod rules are as :meth:`add` installed them (changes nothing)."""
        return self.rules.check(netns_path, self.settings_for(pod))

    def reapply_rules(self, pod: PodInfo, netns_path: str) -> CheckReport:
        """Install ``pod``'s rules again (drift repair); returns the check after."""
        settings = self.settings_for(pod)
        self.rules.apply(netns_path, settings)
        return self.rules.check(netns_path, settings)

    def clear_annotation(self, pod: PodInfo) -> None:
        self.annotator.patch_redirection(pod.namespace, pod.name, None)

    def remove(self, pod: PodInfo, *, exists: bool) -> None:
        """Take ``pod`` out of the mesh; idempotent (events repeat)."""
        plog = PodLogger(log, pod.namespace, pod.name, pod.uid)
        entry = self.cache.get(pod.uid)
        ips = entry.ips if entry is not None and entry.ips else pod.ips
        # 1. probe set
        self.probes.remove(pod.uid, ips)
        # 2. cache
        entry = self.cache.pop(pod.uid)
        try:
            # 3. rules, only while the pod (and so its namespace) still exists
            if exists and entry is not None and entry.netns_path is not None:
                try:
                    self.rules.remove(entry.netns_path, self.settings_for(pod))
                except NetnsError as e:
                    plog.debug("namespace already gone", extra={"fields": {"error": str(e)}})
        finally:
            if entry is not None and entry.netns is not None:
                entry.netns.close()
        # 4. ztunnel
        self.ztunnel.delete(pod.uid)
        # 5. annotation
        if exists and (entry is not None or pod.redirection_annotation is not None):
            self.annotator.patch_redirection(pod.namespace, pod.name, None)
        if self.observer is not None:
            self.observer.removed()
        plog.info("pod removed", extra={"fields": {"rules_removed": exists}})
