"""Restart safety and drift repair.

At start (after the informers synced, before the agent is ready): every pod of this node
annotated ``enabled`` and not terminal is adopted into the cache with its namespace found
again through /proc (not found = ztunnel gets a Keep), so the first ztunnel connection
receives a full snapshot. Rules are never removed on exit, so a restart leaves traffic alone.

Then, on start (``AMBIENT_RECONCILE_POD_RULES_ON_STARTUP``, default on) and every
``period`` seconds, each enrolled pod is checked:
- namespace replaced under the same UID (/proc shows the pod in a namespace whose inode
  differs from the one held): the pod is enrolled again in the new namespace (rules there,
  ZDS Add with the new fd, which makes ztunnel replace its proxy);
- rules removed or changed behind the agent's back (backend ``check`` not ok): applied again.
Repairs run under the pod's work-queue key, never concurrently with an event for that pod.

Why 60 s by default: one pass costs one /proc walk plus one rule check per pod, about 7 ms
of CPU per pod with the iptables backend (an ``iptables-save`` per family in the pod
namespace; ~4 ms with nftables), i.e. ~7 s of one core per pass at 1000 pods, ~12% of a
core at 60 s. The common replacement case (sandbox re-created) is already handled at once by
the plugin's ``cmdadd``, so the periodic pass is a safety net for out-of-band changes, where
a minute of exposure is an acceptable bound. Configurable (``RECONCILE_PERIOD_SECONDS``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from cni_plugin import constants as c
from cni_plugin.errors import IstioCniError, NetnsError
from cni_plugin.netns import Netns
from node_agent.enrollment import Enroller
from node_agent.logs import PodLogger
from node_agent.netns_finder import FoundNetns
from node_agent.pod_cache import CachedPod, PodCache, PodState
from node_agent.pod_controller import NetnsOpener, Store
from node_agent.resources import PodInfo
from node_agent.state import RuleCheck

log = logging.getLogger("node_agent.reconciler")

# Cached pods whose rules a pass checks (pending ones are the controller's to retry).
CHECKED_STATES = (PodState.ENABLED, PodState.FAILED)


class NetnsScan(Protocol):
    """Walks the host's processes for pod namespaces (the real one is ``NetnsFinder``)."""

    def scan(self, wanted: set[str] | None = None) -> dict[str, FoundNetns]: ...


class KeyRunner(Protocol):
    def run_exclusive(self, key: str, work: Callable[[], Any]) -> Any: ...


@dataclass
class PassReport:
    checked: int = 0
    rules_repaired: list[str] = field(default_factory=list)
    netns_replaced: list[str] = field(default_factory=list)
    netns_found: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


class Reconciler:
    def __init__(
        self,
        *,
        pods: Store[PodInfo],
        cache: PodCache,
        enroller: Enroller,
        finder: NetnsScan,
        opener: NetnsOpener,
        runner: KeyRunner,
        wants: Callable[[PodInfo], bool],
        period: float = 60.0,
        on_repair: Callable[[str], None] = lambda reason: None,
        after_pass: Callable[[], object] | None = None,
    ) -> None:
        self.pods = pods
        self.cache = cache
        self.enroller = enroller
        self.finder = finder
        self.opener = opener
        self.runner = runner
        self.wants = wants
        self.period = period
        self.on_repair = on_repair
        # Backend housekeeping once per pass (the node-wide lifecycle's: for ebpf, delete
        # the pins of pods gone without DEL).
        self.after_pass = after_pass
        self.checks: dict[str, RuleCheck] = {}
        self.last_pass: PassReport | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- startup --------------------------------------------------------------------------
    def adopt_annotated(self) -> int:
        """Rebuild the cache from pods annotated ``enabled`` (the ZDS snapshot source)."""
        annotated = [
            p
            for p in self.pods.items()
            if p.redirection_annotation == c.REDIRECTION_ENABLED and not p.terminal
        ]
        found = self.finder.scan({p.uid for p in annotated}) if annotated else {}
        missing = 0
        for pod in annotated:
            hit = found.get(pod.uid)
            netns: Netns | None = None
            if hit is not None:
                try:
                    netns = self.opener.open(hit.path)
                except NetnsError:
                    netns = None
            if netns is None:
                missing += 1
            self.enroller.adopt(pod, netns)
        log.info(
            "adopted enrolled pods from annotations",
            extra={"fields": {"pods": len(annotated), "netns_not_found": missing}},
        )
        return len(annotated)

    # -- checks ---------------------------------------------------------------------------
    def run_pass(self, parallel: int = 1, *, upkeep: bool = True) -> PassReport:
        """Check every enrolled pod once; repair what drifted. ``parallel`` pods at a time
        (the start-up pass, which the ZDS snapshot waits for, uses the agent's workers: each
        check is mostly a rule dump in the pod's namespace, a subprocess or netlink round
        trip, so they overlap; the periodic pass stays one at a time, gentle on the node).
        ``upkeep=False`` skips ``after_pass`` (the start-up pass: the agent set the node-wide
        state up just before; 0.5 s of the ready path, measured)."""
        t0 = time.monotonic()
        report = PassReport()
        entries = [e for e in self.cache.entries() if e.state in CHECKED_STATES]
        found = self.finder.scan({e.uid for e in entries}) if entries else {}
        lock = threading.Lock()

        def check(entry: CachedPod) -> None:
            pod: PodInfo | None = self.pods.get(entry.uid)
            if pod is None or pod.terminal or not self.wants(pod):
                return  # the controller removes it
            hit = found.get(entry.uid)
            outcome: list[str] | None = None
            error = ""
            try:
                if hit is not None and (entry.netns is None or hit.ident != entry.netns.ident):
                    reason = "netns_found" if entry.netns is None else "netns_replaced"
                    self._reenroll(pod, hit.path, reason, entry.netns_inode, hit.ident.inode)
                    outcome = report.netns_found if entry.netns is None else report.netns_replaced
                elif entry.netns is not None and self._repair_rules(pod):
                    outcome = report.rules_repaired
            except IstioCniError as e:
                error = str(e)
                PodLogger(log, pod.namespace, pod.name, pod.uid).warning(
                    "drift repair failed", extra={"fields": {"error": error}}
                )
            with lock:
                report.checked += 1
                if outcome is not None:
                    outcome.append(pod.uid)
                if error:
                    report.errors[pod.uid] = error

        if parallel > 1 and len(entries) > 1:
            with ThreadPoolExecutor(min(parallel, len(entries)), "reconcile") as pool:
                list(pool.map(check, entries))  # list(): re-raises what a check raised
        else:
            for entry in entries:
                check(entry)
        for uid in [u for u in self.checks if u not in self.cache]:
            del self.checks[uid]  # pods gone since: keep the record bounded
        if upkeep and self.after_pass is not None:
            try:
                self.after_pass()
            except (OSError, IstioCniError) as e:
                log.warning("backend housekeeping failed", extra={"fields": {"error": str(e)}})
        report.seconds = time.monotonic() - t0
        self.last_pass = report
        log.info(
            "reconcile pass done",
            extra={
                "fields": {
                    "checked": report.checked,
                    "rules_repaired": len(report.rules_repaired),
                    "netns_replaced": len(report.netns_replaced),
                    "netns_found": len(report.netns_found),
                    "errors": len(report.errors),
                    "ms": round(report.seconds * 1000, 1),
                }
            },
        )
        return report

    def _reenroll(self, pod: PodInfo, path: str, reason: str, old: int | None, new: int) -> None:
        def work() -> None:
            netns = self.opener.open(path)
            self.enroller.add(pod, netns)

        PodLogger(log, pod.namespace, pod.name, pod.uid).warning(
            "pod namespace changed, enrolling again",
            extra={"fields": {"reason": reason, "old_inode": old, "new_inode": new}},
        )
        self.runner.run_exclusive(pod.uid, work)
        self.on_repair(reason)

    def _repair_rules(self, pod: PodInfo) -> bool:
        def work() -> bool:
            entry = self.cache.get(pod.uid)
            path = entry.netns_path if entry is not None else None
            if entry is None or path is None:
                return False
            rep = self.enroller.check_rules(pod, path)
            check = RuleCheck(ok=rep.ok, missing=rep.missing, extra=rep.extra, at=time.time())
            self.checks[pod.uid] = check
            if rep.ok:
                if entry.state == PodState.FAILED:
                    entry.state, entry.last_error = PodState.ENABLED, ""
                return False
            PodLogger(log, pod.namespace, pod.name, pod.uid).warning(
                "redirection rules drifted, applying again",
                extra={"fields": {"missing": len(rep.missing), "extra": len(rep.extra)}},
            )
            after = self.enroller.reapply_rules(pod, path)
            self.checks[pod.uid] = replace(check, repaired_ok=after.ok)
            return True

        repaired: bool = self.runner.run_exclusive(pod.uid, work)
        if repaired:
            self.on_repair("rules_missing")
        return repaired

    # -- loop -----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="reconciler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.run_pass()
            except Exception:
                log.exception("reconcile pass crashed; next pass will retry")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
