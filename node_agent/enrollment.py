"""Adding a pod to the mesh and removing it (SPEC §4, 1.25+ semantics, listeners first).

Add, for a pod with an open namespace handle. The pod must never run unredirected once it
is meant to be in the mesh, and its traffic must never be redirected to ztunnel ports that
nothing listens on yet (issue 19: new connections of a running pod were refused in the gap
between its rules and ztunnel's listeners). ztunnel opens a pod's listeners before it acks
the Add, so, while a ztunnel is connected:
  1. ZDS Add with the namespace fd (the pod is cached first, so a ztunnel reconnecting
     meanwhile gets it in its snapshot). Failure: continue as without ztunnel, below.
  2. install in-pod rules (backend ``apply``, idempotent; a running pod's open connections
     primed under a NAT hold first, :mod:`node_agent.nat_hold`). Failure: not retryable for
     this attempt (:class:`NotRetryableError`, as Istio's ``ErrNonRetryableAdd``); a pod
     new to the agent leaves ztunnel and the cache again.
Without a connected ztunnel, SPEC §4's order, so the pod is captured at once:
  1. rules (failure: not retryable, nothing cached, nothing annotated);
  2. ZDS Add. Failure: the pod is cached as ``pending`` (so the next ztunnel snapshot
     carries it), annotated ``pending``, and the error is raised so the caller retries.
Then, either way:
  3. add the pod IPs to the host probe ipset.
  4. annotate ``ambient.istio.io/redirection: enabled`` (skipped when already so): only now
     are its traffic captured and ztunnel holding it.
Remove: probe set, cache, rules (only while the pod still exists: a deleted pod's
namespace is gone with it; a running pod's through its backend's departure, which keeps
captured connections on their path until ztunnel has drained them,
:mod:`node_agent.departure`), annotation null (404 ignored), then ZDS Del on every
connection. For a pod that keeps running, the Del waits ``leave_grace`` seconds: other
ztunnels keep sending it HBONE until istiod has told them it left (the annotation), and
its own ztunnel's listeners must still be there to take those connections. Istio sends
the Del first and unannotates after, which refuses them (issue 19).
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
from cni_plugin.redirection.pod_overrides import PodOverrides
from cni_plugin.redirection.settings import RedirectSettings
from node_agent.logs import PodLogger
from node_agent.nat_hold import PRIME_S
from node_agent.pod_cache import CachedPod, PodCache, PodState, ZdsState
from node_agent.resources import PodInfo

log = logging.getLogger("node_agent.enrollment")

# How long a pod that left the mesh keeps its ztunnel listeners after its annotation went:
# istiod's push to the other ztunnels (debounce 100 ms, then the push) fits well inside.
LEAVE_GRACE_S = 2.0
# ztunnel's DEFAULT_CONNECTION_TERMINATION_DEADLINE: how long a deleted pod's proxied
# connections may still run (and so need their redirection's NAT).
ZTUNNEL_DRAIN_S = 5.0


# The in-pod half of a redirection backend is all enrollment calls.
Rules = PodRedirection


class Ztunnel(Protocol):
    """The ZDS server as enrollment sees it."""

    @property
    def connected(self) -> bool: ...

    def add_pod(self, pod: CachedPod, netns_path: str) -> None: ...

    def delete(self, uid: str) -> None: ...

    def delete_later(self, uid: str, delay: float) -> None:
        """Del after ``delay`` seconds, unless an Add or Del of ``uid`` comes first."""
        ...


class ProbeSet(Protocol):
    """Host-side set of enrolled pod IPs that kubelet probes are SNATed to."""

    def add(self, uid: str, ips: tuple[str, ...]) -> None: ...

    def remove(self, uid: str, ips: tuple[str, ...]) -> None: ...


class Annotator(Protocol):
    def patch_redirection(self, namespace: str, name: str, value: str | None) -> bool: ...


class NatHolder(Protocol):
    """Keeps conntrack and NAT alive in a pod namespace while its rules change
    (:class:`node_agent.nat_hold.NatHold`)."""

    def hold(self, netns_path: str) -> None: ...

    def release(self, netns_path: str) -> None: ...

    def open_connections(self, netns_path: str) -> int: ...


class Departure(Protocol):
    """Takes a running pod's redirection out without cutting its captured connections
    (:mod:`node_agent.departure`): new ones go direct at once, the rest is removed after
    ``drain_s``; ``cancel`` drops what is still pending (the pod is enrolled again)."""

    def leave(
        self, uid: str, netns_path: str, settings: RedirectSettings, drain_s: float
    ) -> None: ...

    def cancel(self, uid: str) -> None: ...


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
        *,
        leave_grace: float = LEAVE_GRACE_S,
        nat: NatHolder | None = None,
        departure: Departure | None = None,
        prime_s: float = PRIME_S,
    ) -> None:
        self.leave_grace = leave_grace
        self.nat = nat
        self.departure = departure
        self.prime_s = prime_s
        self.rules = rules
        self.ztunnel = ztunnel
        self.probes = probes
        self.annotator = annotator
        self.cache = cache
        self.settings_for = settings_for
        self.observer = observer

    def add(
        self, pod: PodInfo, netns: Netns, *, started: float | None = None, running: bool = True
    ) -> CachedPod:
        """Enroll ``pod`` whose namespace is ``netns`` (ownership passes to the cache).
        ``running``: the pod may have open connections (not a sandbox being made by the CNI
        plugin): they are primed under a NAT hold first, so the rules leave them alone."""
        t0 = started if started is not None else time.monotonic()
        plog = PodLogger(log, pod.namespace, pod.name, pod.uid)
        settings = self.settings_for(pod)
        for problem in PodOverrides.from_annotations(pod.annotations).problems:
            plog.warning(problem)
        prev = self.cache.get(pod.uid)
        if (
            prev is not None
            and prev.only_annotation_left is not None
            and prev.only_annotation_left == settings
            and prev.netns is netns
            and prev.zds == ZdsState.ACKED
            and self.ztunnel.connected
        ):
            # The last attempt failed on the API server (an outage): ztunnel holds the pod
            # and its rules are in; a second Add and rules install would be duplicate work.
            if self.departure is not None:
                self.departure.cancel(pod.uid)
            return self._complete(pod, prev, plog, t0, lambda _name: None)
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
        if self.departure is not None:
            self.departure.cancel(pod.uid)  # a removal still pending must not undo this
        listening = False
        refused: ZtunnelUnavailableError | ZtunnelRejectedError | None = None
        if self.ztunnel.connected:
            # 1. ztunnel first: its listeners exist before anything is redirected to them.
            self.cache.put(entry)
            try:
                self.ztunnel.add_pod(entry, path)
                listening = True
                entry.zds = ZdsState.ACKED
            except (ZtunnelUnavailableError, ZtunnelRejectedError) as e:
                refused = e  # not asked twice: the rules go in, the pod stays pending
            step("ztunnel")
        # 2. rules
        primed = running and self._prime(path)
        try:
            self.rules.apply(path, settings)
        except IstioCniError as e:
            self._undo_failed_rules(pod, entry, prev, listening)
            plog.warning("cannot install redirection rules", extra={"fields": {"error": str(e)}})
            raise NotRetryableError(f"installing redirection for {pod.key} failed: {e}") from e
        finally:
            if primed and self.nat is not None:
                self.nat.release(path)  # the rules themselves keep conntrack and NAT on now
        step("rules")
        if not listening:
            self.cache.put(entry)
            try:
                if refused is not None:
                    raise refused
                self.ztunnel.add_pod(entry, path)
            except (ZtunnelUnavailableError, ZtunnelRejectedError) as e:
                entry.state, entry.zds, entry.last_error = (
                    PodState.PENDING,
                    ZdsState.PENDING,
                    str(e),
                )
                plog.warning(
                    "ztunnel did not take the pod yet", extra={"fields": {"error": str(e)}}
                )
                if pod.redirection_annotation != c.REDIRECTION_PENDING:
                    self.annotator.patch_redirection(pod.namespace, pod.name, c.REDIRECTION_PENDING)
                raise
            entry.zds = ZdsState.ACKED
            step("ztunnel")
        entry.only_annotation_left = settings
        return self._complete(pod, entry, plog, t0, step)

    def _complete(
        self,
        pod: PodInfo,
        entry: CachedPod,
        plog: PodLogger,
        t0: float,
        step: Callable[[str], None],
    ) -> CachedPod:
        """Steps 3 and 4 (probe set, annotation) of a pod whose rules and Add are done."""
        # 3. probe set
        self.probes.add(pod.uid, pod.ips)
        step("probe_set")
        # 4. annotation
        if pod.redirection_annotation != c.REDIRECTION_ENABLED:
            self.annotator.patch_redirection(pod.namespace, pod.name, c.REDIRECTION_ENABLED)
            entry.annotated_at = time.monotonic()
        step("annotate")
        entry.only_annotation_left = None
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

    def _prime(self, path: str) -> bool:
        """Hold NAT and wait for the pod's open connections to be tracked (no NAT)."""
        if self.nat is None or not self.nat.open_connections(path):
            return False
        self.nat.hold(path)
        time.sleep(self.prime_s)
        return True

    def _undo_failed_rules(
        self, pod: PodInfo, entry: CachedPod, prev: CachedPod | None, listening: bool
    ) -> None:
        """Rules could not be installed. A pod new to this agent leaves ztunnel and the cache
        again (nothing was redirected to it); a known one keeps ztunnel's proxy (its older
        rules may still redirect to it) and its previous entry, marked failed, when that
        entry owns this namespace handle. Otherwise the handle is closed."""
        if listening and prev is None:
            self.ztunnel.delete(pod.uid)
        if prev is not None and prev.netns is entry.netns:
            self.cache.put(prev)
            prev.state, prev.last_error = PodState.FAILED, "installing redirection failed"
            return
        if self.cache.get(pod.uid) is entry:
            self.cache.pop(pod.uid)
        if entry.netns is not None:
            entry.netns.close()

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
                path, settings = entry.netns_path, self.settings_for(pod)
                try:
                    if self.departure is not None:
                        # Captured connections keep their path until ztunnel has drained.
                        drain_s = self.leave_grace + ZTUNNEL_DRAIN_S + 1.0
                        self.departure.leave(pod.uid, path, settings, drain_s)
                    else:
                        self.rules.remove(path, settings)
                except NetnsError as e:
                    plog.debug("namespace already gone", extra={"fields": {"error": str(e)}})
        finally:
            if entry is not None and entry.netns is not None:
                entry.netns.close()
        # 4. annotation: istiod tells the other ztunnels to stop sending it HBONE
        if exists and (entry is not None or pod.redirection_annotation is not None):
            self.annotator.patch_redirection(pod.namespace, pod.name, None)
        # 5. ztunnel, once they had time to hear it (a deleted pod: at once)
        if exists and self.leave_grace > 0:
            self.ztunnel.delete_later(pod.uid, self.leave_grace)
        else:
            self.ztunnel.delete(pod.uid)
        if self.observer is not None:
            self.observer.removed()
        plog.info("pod removed", extra={"fields": {"rules_removed": exists}})
