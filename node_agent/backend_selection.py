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
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cni_plugin.errors import ConfigError
from cni_plugin.redirection.registry import make_backend
from node_agent.config import AgentConfig
from node_agent.enrollment import Rules

if TYPE_CHECKING:
    from cni_plugin.bpf.backend import EbpfBackend

log = logging.getLogger("node_agent.backend")


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
    (the agent also prunes its pins and uninstalls its node objects)."""

    rules: Rules
    ebpf: EbpfBackend | None = None


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
