"""A running pod leaving the mesh without cutting the connections it has (issue 19).

When a pod leaves, its new connections must go direct at once, while the ones its
redirection already sent to ztunnel keep their path until ztunnel has drained them (the
agent's Del grace, then ztunnel's connection termination deadline). What keeps that path
depends on the backend:

- :class:`NetfilterDeparture` (iptables, nftables): conntrack carries each captured
  connection's NAT, as long as the namespace has a NAT user. The rules go at once, under a
  NAT hold (:mod:`node_agent.nat_hold`) released after the drain.
- :class:`EbpfDeparture`: the programs carry captured conversations themselves (their NAT
  map). The pod is switched to the ``draining`` variant (no new connection steered, captured
  ones still are) and the redirection is removed after the drain.

A pod enrolled again meanwhile cancels what is pending for it (``cancel``), so a late
removal never undoes the new enrolment. Pending work runs on a timer thread holding its own
handle on the namespace; one that fails is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

from cni_plugin.errors import IstioCniError
from cni_plugin.netns import Netns
from cni_plugin.redirection.settings import RedirectSettings
from node_agent.enrollment import NatHolder, Rules
from node_agent.keyed_timers import KeyedTimers

log = logging.getLogger("node_agent.departure")


class Pending:
    """At most one delayed job per pod, cancellable until it runs; each holds its own handle
    on the pod's namespace, closed when the job has run or was dropped."""

    def __init__(self) -> None:
        self._timers = KeyedTimers()

    def after(self, uid: str, netns_path: str, delay: float, work: Callable[[str], None]) -> None:
        """Run ``work(path)`` in ``delay`` seconds on a handle of its own on the namespace."""
        try:
            ns = Netns.open(netns_path)
        except IstioCniError as e:
            log.debug("namespace gone: nothing left to do", extra={"fields": {"error": str(e)}})
            return
        self._timers.schedule(uid, delay, lambda: work(f"/proc/self/fd/{ns.fd}"), ns.close)

    def cancel(self, uid: str) -> None:
        self._timers.cancel(uid)


class NetfilterDeparture:
    def __init__(self, rules: Rules, hold: NatHolder) -> None:
        self.rules = rules
        self.hold = hold
        self.pending = Pending()

    def leave(self, uid: str, netns_path: str, settings: RedirectSettings, drain_s: float) -> None:
        self.hold.hold(netns_path)
        self.pending.after(uid, netns_path, drain_s, self.hold.release)
        self.rules.remove(netns_path, settings)

    def cancel(self, uid: str) -> None:
        self.pending.cancel(uid)  # enrolling again places (and releases) a hold of its own


class EbpfDeparture:
    def __init__(self, rules: Rules) -> None:
        self.rules = rules
        self.pending = Pending()

    def leave(self, uid: str, netns_path: str, settings: RedirectSettings, drain_s: float) -> None:
        self.rules.apply(netns_path, replace(settings, draining=True))
        self.pending.after(uid, netns_path, drain_s, lambda p: self.rules.remove(p, settings))

    def cancel(self, uid: str) -> None:
        self.pending.cancel(uid)
