"""The agent's configuration: SPEC §4 environment (1.24 names and defaults) plus host paths.

One immutable :class:`AgentConfig` is built once at start (:meth:`AgentConfig.from_env`,
flags may override) and handed to the composition root. Host paths are configurable so the
agent runs "as the DaemonSet would": ``/host/proc`` for discovery, ``/host/var/run/netns``
for the runtime's namespaces, the run dir and the ztunnel socket on their mounts.
A bad value raises :class:`~cni_plugin.errors.ConfigError` naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from cni_plugin import constants as c
from cni_plugin.enablement import DEFAULT_SELECTORS, EnablementSelector
from cni_plugin.env_flags import env_bool
from cni_plugin.errors import ConfigError
from cni_plugin.redirection.pod_overrides import pod_settings
from cni_plugin.redirection.settings import RedirectSettings
from install.config import enablement_selectors_from_env
from node_agent.resources import PodInfo
from node_agent.state import STATE_FILE

# Reconcile period default: see reconciler.py for why 60 s.
DEFAULT_RECONCILE_SECONDS = 60.0


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer: set a number") from None


def _uid(env: Mapping[str, str], name: str) -> int:
    uid = _int(env, name, 0)
    if uid < 0:
        raise ConfigError(f"{name}={uid} is not a uid: set ztunnel's user id (0 for root)")
    return uid


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number: set seconds, e.g. 60") from None


def _list(env: Mapping[str, str], name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    raw = env.get(name)
    if raw is None:
        return default
    return tuple(x.strip() for x in raw.split(",") if x.strip())


def _fallback(env: Mapping[str, str]) -> str:
    raw = (env.get("AMBIENT_REDIRECT_FALLBACK") or "").strip().lower()
    if raw in ("", "none"):
        return ""
    if raw not in ("iptables", "nftables"):
        raise ConfigError(
            f"AMBIENT_REDIRECT_FALLBACK={raw!r}: set iptables, nftables or none (refuse to "
            "start when the ebpf backend cannot run here)"
        )
    return raw


REDIRECT_MODES = ("iptables", "nftables", "ebpf")


def redirect_backend(env: Mapping[str, str]) -> tuple[str, bool]:
    """(backend, chosen by ``NATIVE_NFTABLES``) from the environment. Pure.

    Precedence (docs/istio-parity.md): ``NATIVE_NFTABLES=true`` (Istio's name, Helm
    ``global.nativeNftables``) turns the iptables backend -- the default, and what the
    chart renders as ``AMBIENT_REDIRECT_MODE`` unless told otherwise -- into nftables;
    an explicit ``nftables`` or ``ebpf`` mode stays (ebpf keeps its pods, only the host
    probe goes through nftables). Without it the mode is ``AMBIENT_REDIRECT_MODE``, else
    the older ``REDIRECTION_BACKEND``, else iptables, as before."""
    raw = env.get("AMBIENT_REDIRECT_MODE") or env.get("REDIRECTION_BACKEND") or "iptables"
    mode = raw.strip().lower()
    if mode not in REDIRECT_MODES:
        name = (
            "AMBIENT_REDIRECT_MODE" if env.get("AMBIENT_REDIRECT_MODE") else "REDIRECTION_BACKEND"
        )
        raise ConfigError(
            f"{name}={raw!r}: set iptables, nftables or ebpf (or NATIVE_NFTABLES=true for "
            "Istio's native nftables)"
        )
    if env_bool(env, "NATIVE_NFTABLES", False) and mode == "iptables":
        return "nftables", True
    return mode, False


def _newer_istio_settings(env: Mapping[str, str]) -> dict[str, Any]:
    """The fields of :class:`AgentConfig` that newer Istio added (SPEC §9)."""
    selectors = enablement_selectors_from_env(env)
    backend, from_native = redirect_backend(env)
    return {
        "enablement_selectors": DEFAULT_SELECTORS if selectors is None else selectors,
        "native_nftables": env_bool(env, "NATIVE_NFTABLES", False),
        "backend": backend,
        "backend_from_native": from_native,
    }


@dataclass(frozen=True)
class AgentConfig:
    """Everything the running agent reads from its environment."""

    node_name: str
    ambient_enabled: bool = True
    dns_capture: bool = False
    ipv6: bool = True
    run_dir: str = c.DEFAULT_RUN_DIR
    ztunnel_socket: str = c.DEFAULT_ZTUNNEL_SOCKET
    mounted_cni_net_dir: str = "/host/etc/cni/net.d"
    cni_conf_name: str = ""
    chained: bool = True
    excluded_namespaces: tuple[str, ...] = c.DEFAULT_EXCLUDED_NAMESPACES
    pod_namespace: str = "istio-system"
    system_namespace: str = c.DEFAULT_SYSTEM_NAMESPACE
    monitoring_port: int = c.DEFAULT_MONITORING_PORT
    health_port: int = c.DEFAULT_HEALTH_PORT
    listen_address: str = "0.0.0.0"
    host_probe_snat_ipv4: str = c.HOST_PROBE_SNAT_IPV4
    host_probe_snat_ipv6: str = c.HOST_PROBE_SNAT_IPV6
    reconcile_rules_on_startup: bool = True
    # Host paths (DaemonSet mounts).
    proc_root: str = "/host/proc"
    netns_dir: str = "/host/var/run/netns"
    # The namespace treated as "the host" (never a pod's): from config, else our own.
    host_netns: str = "/proc/self/ns/net"
    # Where host-side probe rules go; empty = the namespace the agent runs in (the node).
    # ALLOW_SWITCH_TO_HOST_NS=true (Istio's name; the chart sets it) makes it the node's own
    # (<proc_root>/1/ns/net), so a pod not sharing the host network namespace
    # (ambient.shareHostNetworkNamespace=false) still puts them on the node.
    node_netns: str = ""
    kubeconfig: str = ""
    # Redirection backend (iptables, nftables, ebpf) and what to do when ebpf cannot run
    # here: "" = refuse to start, "iptables"/"nftables" = use that instead (logged).
    backend: str = "iptables"
    backend_fallback: str = ""
    # eBPF backend: pin root on the host's bpffs (mounted into the agent) and the host's
    # cgroup v2 root as mounted into the agent ("" = autodetect, right outside a container).
    bpf_pin_root: str = "/sys/fs/bpf/istio-cni"
    host_cgroup2_root: str = ""
    reconcile_seconds: float = DEFAULT_RECONCILE_SECONDS
    workers: int = 16
    install_cni: bool = False
    log_level: str = "info"
    # JSON log lines (ours since the start) or Istio's text lines (LOG_AS_JSON=false).
    log_as_json: bool = True
    # Istio's ambient-disable-safe-upgrade: every stop uninstalls (no DaemonSet question).
    disable_safe_upgrade: bool = False
    # The only uid whose processes may speak ZDS (SO_PEERCRED): Istio's chart runs ztunnel
    # as root. ZTUNNEL_UID for a ztunnel running as another user.
    ztunnel_uid: int = 0
    # Newer Istio's settings (SPEC §9), kept together.
    # AMBIENT_ENABLEMENT_SELECTOR: which pods opt in; unset = the 1.24 rule.
    enablement_selectors: tuple[EnablementSelector, ...] = DEFAULT_SELECTORS
    # NATIVE_NFTABLES (Helm global.nativeNftables): the host probe rule and sets go through
    # nftables (kubelet matched by UID), and an iptables backend becomes nftables
    # (backend_from_native says it did: a node still holding the iptables probe ipsets
    # then keeps iptables, as Istio's agent does; see backend_selection).
    native_nftables: bool = False
    backend_from_native: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AgentConfig:
        e = os.environ if env is None else env
        node = e.get("NODE_NAME", "")
        if not node:
            raise ConfigError(
                "NODE_NAME is not set: the agent only handles pods of its own node; set it "
                "from the downward API (spec.nodeName) or pass --node-name"
            )
        return cls(
            node_name=node,
            ambient_enabled=env_bool(e, "AMBIENT_ENABLED", True),
            dns_capture=env_bool(e, "AMBIENT_DNS_CAPTURE", False),
            ipv6=env_bool(e, "AMBIENT_IPV6", True),
            run_dir=e.get("CNI_AGENT_RUN_DIR") or c.DEFAULT_RUN_DIR,
            ztunnel_socket=e.get("ZTUNNEL_UDS_ADDRESS") or c.DEFAULT_ZTUNNEL_SOCKET,
            mounted_cni_net_dir=e.get("MOUNTED_CNI_NET_DIR") or "/host/etc/cni/net.d",
            cni_conf_name=e.get("CNI_CONF_NAME", ""),
            chained=env_bool(e, "CHAINED_CNI_PLUGIN", True),
            excluded_namespaces=_list(e, "EXCLUDE_NAMESPACES", c.DEFAULT_EXCLUDED_NAMESPACES),
            pod_namespace=e.get("POD_NAMESPACE") or "istio-system",
            system_namespace=e.get("SYSTEM_NAMESPACE") or c.DEFAULT_SYSTEM_NAMESPACE,
            monitoring_port=_int(e, "MONITORING_PORT", c.DEFAULT_MONITORING_PORT),
            health_port=_int(e, "HEALTH_PORT", c.DEFAULT_HEALTH_PORT),
            host_probe_snat_ipv4=e.get("HOST_PROBE_SNAT_IP") or c.HOST_PROBE_SNAT_IPV4,
            host_probe_snat_ipv6=e.get("HOST_PROBE_SNAT_IPV6") or c.HOST_PROBE_SNAT_IPV6,
            reconcile_rules_on_startup=env_bool(e, "AMBIENT_RECONCILE_POD_RULES_ON_STARTUP", True),
            proc_root=e.get("HOST_PROC") or "/host/proc",
            netns_dir=e.get("HOST_NETNS_DIR") or "/host/var/run/netns",
            host_netns=e.get("HOST_NETNS") or "/proc/self/ns/net",
            node_netns=e.get("NODE_NETNS")
            or (
                os.path.join(e.get("HOST_PROC") or "/host/proc", "1", "ns", "net")
                if env_bool(e, "ALLOW_SWITCH_TO_HOST_NS", False)
                else ""
            ),
            kubeconfig=e.get("KUBECONFIG", ""),
            # backend: AMBIENT_REDIRECT_MODE pairs with the Helm value ambient.redirectMode
            # (the name Istio 1.18-1.20 used for its own iptables|ebpf choice);
            # REDIRECTION_BACKEND is the older name, still read (bench, rendered manifests);
            # NATIVE_NFTABLES over both: redirect_backend, in _newer_istio_settings.
            backend_fallback=_fallback(e),
            bpf_pin_root=e.get("AMBIENT_EBPF_PIN_ROOT") or "/sys/fs/bpf/istio-cni",
            host_cgroup2_root=e.get("HOST_CGROUP2_ROOT", ""),
            reconcile_seconds=_float(e, "RECONCILE_PERIOD_SECONDS", DEFAULT_RECONCILE_SECONDS),
            workers=_int(e, "AGENT_WORKERS", 16),
            install_cni=env_bool(e, "INSTALL_CNI", False),
            log_level=e.get("LOG_LEVEL") or "info",
            log_as_json=env_bool(e, "LOG_AS_JSON", True),
            disable_safe_upgrade=env_bool(e, "AMBIENT_DISABLE_SAFE_UPGRADE", False),
            ztunnel_uid=_uid(e, "ZTUNNEL_UID"),
            **_newer_istio_settings(e),
        )

    def with_overrides(self, **changes: Any) -> AgentConfig:
        """A copy with the given fields replaced; ``None`` values are ignored (unset flags).
        A ``backend`` given here (``--backend``) is the operator's own choice: it wins over
        ``NATIVE_NFTABLES`` for the pods (the host probe still follows that setting)."""
        given = {k: v for k, v in changes.items() if v is not None}
        if "backend" in given:
            given.setdefault("backend_from_native", False)
        return replace(self, **given)

    @property
    def plugin_event_socket(self) -> str:
        return os.path.join(self.run_dir, c.PLUGIN_EVENT_SOCKET)

    @property
    def state_file(self) -> str:
        return os.path.join(self.run_dir, STATE_FILE)

    def settings_for(self, pod: PodInfo) -> RedirectSettings:
        """The in-pod redirection for ``pod``: the node's settings (DNS capture, IPv6, probe
        SNAT addresses) under the pod's own annotations, with Istio's names and parsing
        (:mod:`cni_plugin.redirection.pod_overrides`): ``ambient.istio.io/dns-capture``
        over ``AMBIENT_DNS_CAPTURE``, ``ambient.istio.io/bypass-inbound-capture`` and
        ``istio.io/reroute-virtual-interfaces``. The same pod always gets the same
        settings, so apply, check and remove agree."""
        node = RedirectSettings(
            dns_capture=self.dns_capture,
            ipv6=self.ipv6,
            probe_snat_ipv4=self.host_probe_snat_ipv4,
            probe_snat_ipv6=self.host_probe_snat_ipv6,
        )
        return pod_settings(node, pod.annotations)

    def host_netns_path(self, runtime_path: str) -> str:
        """Map a namespace path as the runtime/plugin sees it on the host to our mounts.

        ``/var/run/netns/X`` and ``/run/netns/X`` live under ``netns_dir``; ``/proc/...``
        under ``proc_root``; anything else is used as given.
        """
        for prefix in ("/var/run/netns/", "/run/netns/"):
            if runtime_path.startswith(prefix):
                return os.path.join(self.netns_dir, runtime_path[len(prefix) :])
        if runtime_path.startswith("/proc/"):
            return os.path.join(self.proc_root, runtime_path[len("/proc/") :])
        return runtime_path
