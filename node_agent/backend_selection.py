"""Which redirection backend the agent runs with: the configured one, or its fallback.

Role: build the backend named by ``AMBIENT_REDIRECT_MODE`` with its host paths. For
``ebpf``, :func:`cni_plugin.bpf.availability.probe` runs first (bpffs at the pin root, a
cgroup v2 root, a program image from the cache or bcc plus kernel headers, the kernel
accepting the programs). When it says no:
- ``AMBIENT_REDIRECT_FALLBACK=iptables`` (or ``nftables``): one warning naming what is
  missing and what to install, then the fallback backend;
- otherwise a :class:`ConfigError` with that same text: the agent refuses to start (exit 1,
  one line), before it has served, installed or changed anything.
Invariant: nothing is created on the host by a refused start (the probe only reads, and
closes the maps and programs it loaded to ask the kernel).

The agent runs what :meth:`Selection.pod_rules` and :meth:`Selection.node_lifecycle` give
it: in-pod rules, and the backend's node-wide lifecycle (:class:`NodeLifecycle`: set up,
housekeeping once per reconcile pass, teardown on uninstall). This module is the only one
of the agent that knows which backend runs; for ebpf the lifecycle prunes the pins of pods
gone without DEL and removes the node-wide objects on uninstall, for the rule backends it
has nothing node-wide (the host probe rule and sets are the agent's own, for every backend).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from cni_plugin.errors import ConfigError
from cni_plugin.redirection.registry import make_backend
from node_agent.adapters import SerialRules
from node_agent.bpf_pins import PinPruner
from node_agent.config import AgentConfig
from node_agent.enrollment import Rules

if TYPE_CHECKING:
    from cni_plugin.bpf.backend import EbpfBackend

log = logging.getLogger("node_agent.backend")

# Backends the agent calls one at a time (see SerialRules for why ebpf still is).
SERIAL_BACKENDS = ("ebpf",)


class NodeLifecycle(Protocol):
    """The node-wide half of the running backend, as the agent drives it."""

    def setup(self) -> None:
        """At start, before any pod is enrolled."""

    def housekeeping(self) -> None:
        """Once per reconcile pass (may raise OSError/IstioCniError: logged, next pass)."""

    def teardown(self, uninstalling: Callable[[], bool]) -> None:
        """At stop: remove node-wide state when ``uninstalling()`` says the agent is being
        uninstalled (asked only by a lifecycle that has node-wide state)."""


class NoNodeState:
    """Rule backends (iptables, nftables): everything they install lives in the pods."""

    def setup(self) -> None:
        pass

    def housekeeping(self) -> None:
        pass

    def teardown(self, uninstalling: Callable[[], bool]) -> None:
        pass


class EbpfNodeState:
    """The eBPF backend's node-wide objects under its pin root (programs, the ``nat`` map,
    the cgroup ``getsockopt`` link) and the per-pod pins: pruned while running, removed
    on uninstall once no pod uses them."""

    def __init__(self, ebpf: EbpfBackend, pruner: PinPruner) -> None:
        self.ebpf = ebpf
        self.pruner = pruner

    def setup(self) -> None:
        # Created by the first pod's apply (and re-created if removed behind our back).
        log.debug("ebpf node objects", extra={"fields": {"pin_root": str(self.ebpf.pin_root)}})

    def housekeeping(self) -> None:
        self.pruner.run()

    def teardown(self, uninstalling: Callable[[], bool]) -> None:
        if not uninstalling():
            return
        try:
            removed = self.ebpf.uninstall_node()
        except OSError as e:
            log.warning(
                "could not remove the ebpf node objects", extra={"fields": {"error": str(e)}}
            )
            return
        if removed:
            log.info(
                "uninstall: ebpf node objects removed",
                extra={"fields": {"pin_root": str(self.ebpf.pin_root)}},
            )
        else:
            log.warning(
                "uninstall: ebpf node objects kept, pods still redirected by them",
                extra={"fields": {"pods": len(self.ebpf.pinned_pods())}},
            )


def ebpf_backend(cfg: AgentConfig) -> EbpfBackend:
    """The eBPF backend with the agent's host paths (DaemonSet mounts)."""
    from cni_plugin.bpf.backend import EbpfBackend

    return EbpfBackend(
        pin_root=cfg.bpf_pin_root,
        cache_dir=os.path.join(cfg.run_dir, "bpf-cache"),
        host_netns=cfg.host_netns,
        cgroup=cfg.host_cgroup2_root or None,
    )


@dataclass(frozen=True)
class Selection:
    """The backend pods are enrolled with; ``ebpf`` is set when that is the eBPF backend
    (its node lifecycle prunes its pins and uninstalls its node objects)."""

    rules: Rules
    ebpf: EbpfBackend | None = None

    def pod_rules(self) -> Rules:
        """The in-pod half as enrollment calls it (one call at a time where needed)."""
        return SerialRules(self.rules) if self.rules.name in SERIAL_BACKENDS else self.rules

    def node_lifecycle(
        self, cfg: AgentConfig, held: Callable[[], Iterable[int | None]]
    ) -> NodeLifecycle:
        """The node-wide half; ``held``: namespace inodes the agent holds open."""
        if self.ebpf is None:
            return NoNodeState()
        return EbpfNodeState(self.ebpf, PinPruner(self.ebpf, cfg.proc_root, cfg.netns_dir, held))


def select_backend(cfg: AgentConfig) -> Selection:
    """The backend to enrol pods with; raises :class:`ConfigError` when ebpf cannot run
    here and no fallback is configured."""
    if cfg.backend != "ebpf":
        return Selection(make_backend(cfg.backend))
    ebpf = ebpf_backend(cfg)
    verdict = ebpf.probe()
    if verdict.ok:
        return Selection(ebpf, ebpf)
    if not cfg.backend_fallback:
        raise ConfigError(
            f"the ebpf redirection backend cannot run on this node: {verdict.reason}. "
            "Fix that, or set AMBIENT_REDIRECT_FALLBACK=iptables (Helm "
            "ambient.redirectFallback) to run with iptables instead"
        )
    log.warning(
        "ebpf redirection backend unavailable, falling back",
        extra={"fields": {"reason": verdict.reason, "fallback": cfg.backend_fallback}},
    )
    return Selection(make_backend(cfg.backend_fallback))
