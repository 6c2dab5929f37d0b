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

Native nftables (``NATIVE_NFTABLES``, Istio's ``global.nativeNftables``): the host probe
rule and sets go through nftables (:class:`NftablesHostProbe`, kubelet matched by its UID)
and an iptables backend becomes nftables (:func:`node_agent.config.redirect_backend`). As
Istio's agent does, a node still holding the iptables probe ipsets (an agent that ran with
iptables and was upgraded, not uninstalled) keeps iptables for the host probe and for the
pods whose backend came from ``NATIVE_NFTABLES``: their rules are iptables rules, and a
reboot (or an uninstall, which removes the ipsets) completes the move; one warning says so.

The agent runs what :meth:`Selection.pod_rules`, :meth:`Selection.node_lifecycle` and
:meth:`Selection.host_probe_rules` give it: in-pod rules, the host probe, and the
backend's node-wide lifecycle (:class:`NodeLifecycle`: set up,
housekeeping once per reconcile pass, teardown on uninstall). This module is the only one
of the agent that knows which backend runs; for ebpf the lifecycle prunes the pins of pods
gone without DEL and removes the node-wide objects on uninstall, for the rule backends it
has nothing node-wide (the host probe rule and sets are the agent's own, for every backend).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol, cast

from cni_plugin.errors import ConfigError
from cni_plugin.redirection.backend import CheckReport
from cni_plugin.redirection.registry import make_backend
from cni_plugin.redirection.settings import RedirectSettings
from node_agent.bpf_pins import PinPruner
from node_agent.config import AgentConfig
from node_agent.enrollment import Rules
from node_agent.host_probe import HostProbe
from node_agent.node_namespace import iptables_probe_sets, xtables_variant

if TYPE_CHECKING:
    from cni_plugin.bpf.backend import EbpfBackend

log = logging.getLogger("node_agent.backend")

# Backends the agent calls one at a time (see SerialRules for why ebpf still is).
SERIAL_BACKENDS = ("ebpf",)


class SerialRules:
    """A backend behind one lock: one apply/remove/check at a time.

    Kept for the ebpf backend, on purpose, after the backend learnt to lock itself:
    - the original crash (two bcc compiles at once corrupt libbcc's heap: SIGSEGV/SIGABRT)
      is now prevented inside the backend (``image.load_image`` and the variant loading take
      a lock, commit fc27673). ``tests/netns/test_bpf_concurrency.py`` shows it for real: 3
      cold processes x 8 threads released together x 6 rounds of apply/check/remove/apply
      across two settings variants, no error; the same stress without the image lock
      crashed 3 runs out of 3 (rc 139, 139, 134);
    - but one path is not safe to overlap: when the node-wide pins (NAT map, getsockopt
      link) have been removed behind the agent's back, the next ``apply`` closes every
      cached variant's program fds and loads new ones, while another thread may be
      attaching with the old fds (closed, possibly reused numbers). Serialising the calls
      excludes that;
    - the cost is small: an ebpf apply is a few milliseconds of netlink and pinning (no
      subprocess), so one at a time still enrols hundreds of pods per second.
    Pin pruning (``node_agent.bpf_pins``) runs outside this lock: it only deletes pins of
    namespaces that are gone, and only pins listed before the live namespaces were.
    """

    def __init__(self, inner: Rules) -> None:
        self.inner = inner
        self.name = inner.name
        self._lock = threading.Lock()

    def apply(self, netns_path: str, settings: RedirectSettings) -> None:
        with self._lock:
            self.inner.apply(netns_path, settings)

    def remove(self, netns_path: str, settings: RedirectSettings) -> None:
        with self._lock:
            self.inner.remove(netns_path, settings)

    def check(self, netns_path: str, settings: RedirectSettings) -> CheckReport:
        with self._lock:
            return self.inner.check(netns_path, settings)


@dataclass(frozen=True)
class NodeRelease:
    """The outcome of releasing a backend's node-wide state, with its one line for the
    operator (``redirect remove`` / ``uninstall-node`` print it, the agent logs it)."""

    removed: bool  # nothing node-wide of the backend is left (removed now, or never there)
    line: str


class HostProbeRules(Protocol):
    """The host side of kubelet probes as the agent drives it: the probe set enrolment
    writes to (:class:`~node_agent.enrollment.ProbeSet`) plus the rule that uses it
    (:class:`~node_agent.host_probe.HostProbe` for iptables/ipset,
    :class:`~cni_plugin.redirection.nftables_host_probe.NftablesHostProbe` for nftables)."""

    @property
    def variant(self) -> str: ...

    def setup(self) -> None: ...

    def ensure(self) -> bool: ...

    def sync(
        self, enrolled: Mapping[str, tuple[str, ...]], keep: set[str] | None = None
    ) -> int: ...

    def describe(self) -> list[str]: ...

    def teardown(self) -> None: ...

    def members(self) -> dict[str, str]: ...

    def add(self, uid: str, ips: tuple[str, ...]) -> None: ...

    def remove(self, uid: str, ips: tuple[str, ...]) -> None: ...


class NodeLifecycle(Protocol):
    """The node-wide half of a backend, as the agent and ``istio-cni-agent redirect`` drive
    it. Everything a backend keeps outside the pods has this owner."""

    def setup(self) -> None:
        """At agent start, before any pod is enrolled."""

    def housekeeping(self) -> None:
        """Once per reconcile pass (may raise OSError/IstioCniError: logged, next pass)."""

    def describe(self) -> list[str]:
        """The node-wide state as it is now, one line each (``redirect check``)."""

    def release(self) -> NodeRelease:
        """Remove the node-wide state if no pod uses it any more; else keep it and say so."""

    def teardown(self, uninstalling: Callable[[], bool]) -> None:
        """At agent stop: release the node-wide state when ``uninstalling()`` says the
        agent is being uninstalled (asked only by a lifecycle that has node-wide state)."""


class NoNodeState:
    """Rule backends (iptables, nftables): everything they install lives in the pods."""

    def __init__(self, backend: str) -> None:
        self.backend = backend

    def setup(self) -> None:
        pass

    def housekeeping(self) -> None:
        pass

    def describe(self) -> list[str]:
        return [
            f"node: the {self.backend} backend keeps nothing node-wide (its rules live in the "
            "pods); the host probe rule and ipsets are the agent's, for every backend: kept "
            "while it is installed, removed by its uninstall when no pod is still enrolled, "
            "else removed by `istio-cni-agent redirect uninstall-node`"
        ]

    def release(self) -> NodeRelease:
        return NodeRelease(True, self.describe()[0])

    def teardown(self, uninstalling: Callable[[], bool]) -> None:
        pass


class EbpfNodeState:
    """The eBPF backend's node-wide objects under its pin root (programs, the ``nat`` map,
    the cgroup ``getsockopt`` link) and the per-pod pins: pruned while the agent runs,
    removed once no pod uses them (agent uninstall, the last ``redirect remove``, or
    ``redirect uninstall-node``). The link's pin is all that keeps ``istio_getsockopt``
    attached to the cgroup (no process holds its fd), so removing the pins detaches it."""

    def __init__(self, ebpf: EbpfBackend, pruner: PinPruner) -> None:
        self.ebpf = ebpf
        self.pruner = pruner

    def setup(self) -> None:
        # Created by the first pod's apply (and re-created if removed behind our back).
        log.debug("ebpf node objects", extra={"fields": {"pin_root": str(self.ebpf.pin_root)}})

    def housekeeping(self) -> None:
        self.pruner.run()

    def describe(self) -> list[str]:
        root = self.ebpf.pin_root
        if not root.exists():
            return [f"node: no ebpf objects under {root}"]
        builds = sorted(root.glob("node-*"))
        links = [b / "getsockopt_link" for b in builds if (b / "getsockopt_link").exists()]
        variants = sorted((root / "progs").glob("*")) if (root / "progs").is_dir() else []
        where = self.ebpf.cgroup or "the cgroup v2 root"
        return [
            f"node: ebpf objects under {root}: {len(self.ebpf.pinned_pods())} pod(s) pinned, "
            f"{len(variants)} program variant(s), {len(builds)} node build(s) (nat map)",
            *(f"node: istio_getsockopt attached to {where} through {link}" for link in links),
        ]

    def release(self) -> NodeRelease:
        root = self.ebpf.pin_root
        if not root.exists():
            return NodeRelease(True, f"node: no ebpf objects under {root}")
        pods = self.ebpf.pinned_pods()
        if pods or not self.ebpf.uninstall_node():
            return NodeRelease(
                False,
                f"node: the ebpf objects under {root} stay ({len(pods)} pod(s) still use them); "
                "`istio-cni-agent redirect uninstall-node --backend ebpf` removes them once "
                "no pod does",
            )
        return NodeRelease(
            True,
            f"node: removed the ebpf objects under {root} (programs, nat map, the "
            "istio_getsockopt cgroup link): no pod uses them any more",
        )

    def teardown(self, uninstalling: Callable[[], bool]) -> None:
        if not uninstalling():
            return
        try:
            outcome = self.release()
        except OSError as e:
            log.warning(
                "could not remove the ebpf node objects", extra={"fields": {"error": str(e)}}
            )
            return
        if outcome.removed:
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
    # Which host probe: "iptables" (ipset + iptables nat) or "nftables" (NATIVE_NFTABLES).
    host_probe: str = "iptables"

    def pod_rules(self) -> Rules:
        """The in-pod half as enrollment calls it (one call at a time where needed)."""
        return SerialRules(self.rules) if self.rules.name in SERIAL_BACKENDS else self.rules

    def node_lifecycle(
        self,
        proc_root: str,
        netns_dir: str,
        held: Callable[[], Iterable[int | None]] = lambda: (),
    ) -> NodeLifecycle:
        """The node-wide half. Housekeeping sees live namespaces under ``proc_root`` and
        ``netns_dir``, plus ``held``: namespace inodes the agent holds open."""
        if self.ebpf is None:
            return NoNodeState(self.rules.name)
        return EbpfNodeState(self.ebpf, PinPruner(self.ebpf, proc_root, netns_dir, held))

    def xtables_variant(self) -> str | None:
        """The xtables variant (``legacy``/``nft``) the in-pod iptables backend detected,
        for the host probe rule to use the same; None for other backends (detect then)."""
        variant = getattr(getattr(self.rules, "applier", None), "variant", None)
        return variant if isinstance(variant, str) else None

    def host_probe_rules(self, cfg: AgentConfig) -> HostProbeRules:
        """The host probe for this selection, in the node namespace; for nftables, kubelet's
        UID is read from ``cfg.proc_root`` now (:class:`ConfigError` when none is seen)."""
        if self.host_probe == "nftables":
            from cni_plugin.redirection.nftables_host_probe import NftablesHostProbe, kubelet_uid

            return NftablesHostProbe(
                kubelet_uid=kubelet_uid(cfg.proc_root),
                ipv6=cfg.ipv6,
                node_netns=cfg.node_netns,
                snat_v4=cfg.host_probe_snat_ipv4,
                snat_v6=cfg.host_probe_snat_ipv6,
            )
        return HostProbe(
            ipv6=cfg.ipv6,
            node_netns=cfg.node_netns,
            snat_v4=cfg.host_probe_snat_ipv4,
            snat_v6=cfg.host_probe_snat_ipv6,
            variant=self.xtables_variant(),
        )

    @classmethod
    def of(cls, backend: Rules) -> Selection:
        """A backend built by name (``redirect``): eBPF's node state is recognised by name."""
        return cls(backend, cast("EbpfBackend", backend) if backend.name == "ebpf" else None)


def native_nftables_plan(cfg: AgentConfig, iptables_sets_present: bool) -> tuple[str, str]:
    """(pod backend, host probe) for ``cfg`` on a node that does or does not still hold the
    iptables probe ipsets. Pure; the rules are in this module's docstring."""
    if not cfg.native_nftables:
        return cfg.backend, "iptables"
    if not iptables_sets_present:
        return cfg.backend, "nftables"
    return ("iptables" if cfg.backend_from_native else cfg.backend), "iptables"


def select_backend(
    cfg: AgentConfig,
    probe_sets: Callable[[str], tuple[bool, str]] = iptables_probe_sets,
) -> Selection:
    """The backend to enrol pods with and the host probe to use; raises
    :class:`ConfigError` when ebpf cannot run here and no fallback is configured.
    ``probe_sets`` looks for the iptables probe ipsets in the node namespace (asked only
    with ``NATIVE_NFTABLES``)."""
    host = "iptables"
    if cfg.native_nftables:
        present, detail = probe_sets(cfg.node_netns)
        backend, host = native_nftables_plan(cfg, present)
        if present:
            log.warning(
                "native nftables configured, but the node still holds the iptables host probe "
                "ipsets: continuing with iptables (reboot the node, or uninstall the agent "
                "first, to complete the move to nftables)",
                extra={"fields": {"found": detail, "backend": backend}},
            )
        else:
            log.info(
                "native nftables: pods and host probe through nftables",
                extra={"fields": {"backend": backend, "ipsets": detail}},
            )
        cfg = replace(cfg, backend=backend)
    if cfg.backend != "ebpf":
        return Selection(_rule_backend(cfg.backend, cfg), host_probe=host)
    ebpf = ebpf_backend(cfg)
    verdict = ebpf.probe()
    if verdict.ok:
        return Selection(ebpf, ebpf, host_probe=host)
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
    return Selection(_rule_backend(cfg.backend_fallback, cfg), host_probe=host)


def _rule_backend(name: str, cfg: AgentConfig) -> Rules:
    """A rule backend; iptables writes the xtables variant of the *node* namespace (which
    is not ours when the pod does not share the host network namespace)."""
    if name == "iptables" and cfg.node_netns:
        variant, reason = xtables_variant(cfg.node_netns)
        log.info(
            "iptables variant of the node namespace",
            extra={"fields": {"variant": variant, "reason": reason, "node_netns": cfg.node_netns}},
        )
        return make_backend(name, variant=variant)
    return make_backend(name)
