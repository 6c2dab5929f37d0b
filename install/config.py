"""The installer's settings, from the environment the DaemonSet gives it (Istio's names).

Paths are as the agent container sees them: the host's CNI dirs are mounted under
``/host``. ``exclude_namespaces`` stays the comma-separated string Istio renders into the
plugin entry. Invalid values raise :class:`ConfigError` naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import yaml

from cni_plugin.constants import DEFAULT_RUN_DIR
from cni_plugin.enablement import EnablementSelector, parse_selectors
from cni_plugin.env_flags import env_bool
from cni_plugin.errors import ConfigError
from install.conf_layout import OWNED_DEFAULT_NAME

SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


# In a source checkout, `make plugin` leaves the executable here.
DEV_BUILD_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build")


def default_source_dir() -> str:
    """The image's /opt/cni/bin, or the checkout's build/ when only that has istio-cni."""
    image_dir = "/opt/cni/bin"
    if not os.path.exists(os.path.join(image_dir, "istio-cni")) and os.path.exists(
        os.path.join(DEV_BUILD_DIR, "istio-cni")
    ):
        return DEV_BUILD_DIR
    return image_dir


ENABLEMENT_SELECTOR_ENV = "AMBIENT_ENABLEMENT_SELECTOR"


def enablement_selectors_from_env(env: Mapping[str, str]) -> tuple[EnablementSelector, ...] | None:
    """``AMBIENT_ENABLEMENT_SELECTOR``: the YAML the chart renders from
    ``ambient.enablementSelectors``. Unset or empty is ``None`` (the caller's default: the
    1.24 rule, :data:`~cni_plugin.enablement.DEFAULT_SELECTORS`; Istio's agent would select
    no pod at all); ``[]`` selects no pod, as in Istio. Read by the agent and the installer,
    which writes it into the plugin's conflist entry."""
    raw = env.get(ENABLEMENT_SELECTOR_ENV, "")
    if not raw.strip():
        return None
    try:
        doc = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError(
            f"{ENABLEMENT_SELECTOR_ENV} is not valid YAML{at}: set it to a list of "
            "{podSelector, namespaceSelector} entries (Helm: ambient.enablementSelectors)"
        ) from None
    return parse_selectors(doc, ENABLEMENT_SELECTOR_ENV)


@dataclass(frozen=True)
class InstallConfig:
    mounted_cni_net_dir: str = "/host/etc/cni/net.d"
    cni_conf_name: str = ""
    chained: bool = True
    cni_bin_source_dir: str = "/opt/cni/bin"
    cni_bin_target_dirs: tuple[str, ...] = ("/host/opt/cni/bin",)
    run_dir: str = DEFAULT_RUN_DIR
    plugin_log_level: str = "info"
    ambient_enabled: bool = True
    exclude_namespaces: str = "kube-system"
    pod_namespace: str = "istio-cni"
    k8s_service_host: str = ""
    k8s_service_port: str = ""
    kube_ca_file: str = f"{SA_DIR}/ca.crt"
    skip_tls_verify: bool = False
    sa_token_file: str = f"{SA_DIR}/token"
    # Outside a pod (development, the testbed): credentials from this kubeconfig instead.
    fallback_kubeconfig: str = ""
    # One repair is free per this many seconds; sooner ones wait up to 1 s (SPEC §7, Istio's
    # installationThrottle: install.installer).
    min_repair_interval_s: float = 5.0
    plugin_binaries: tuple[str, ...] = field(default=("istio-cni",))
    # Written into the plugin entry only when set (unset: the 1.24 entry, default selectors).
    enablement_selectors: tuple[EnablementSelector, ...] | None = None
    # Where the config goes (install.conf_layout): CHAINED_CNI_PLUGIN above,
    # ISTIO_OWNED_CNI_CONFIG / ISTIO_OWNED_CNI_CONF_FILENAME, and CNI_CONF_GROUP_READ (files
    # we create are 0640 instead of 0600).
    istio_owned_config: bool = False
    istio_owned_filename: str = OWNED_DEFAULT_NAME
    conf_group_read: bool = False
    # NATIVE_NFTABLES=true: written into the plugin entry as native_nftables (off: no key,
    # the entry stays the 1.24 one).
    native_nftables: bool | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> InstallConfig:
        d = cls()
        targets = env.get("CNI_BIN_TARGET_DIRS")
        chained = env_bool(env, "CHAINED_CNI_PLUGIN", d.chained)
        owned = env_bool(env, "ISTIO_OWNED_CNI_CONFIG", d.istio_owned_config)
        owned_name = env.get("ISTIO_OWNED_CNI_CONF_FILENAME") or OWNED_DEFAULT_NAME
        if owned and (not owned_name.endswith(".conflist") or "/" in owned_name):
            raise ConfigError(
                f"ISTIO_OWNED_CNI_CONF_FILENAME={owned_name!r}: set a file name ending in "
                ".conflist (default 02-istio-cni.conflist), without a directory"
            )
        return cls(
            mounted_cni_net_dir=env.get("MOUNTED_CNI_NET_DIR") or d.mounted_cni_net_dir,
            cni_conf_name=env.get("CNI_CONF_NAME", ""),
            chained=chained,
            cni_bin_source_dir=env.get("CNI_BIN_SOURCE_DIR") or default_source_dir(),
            cni_bin_target_dirs=(
                tuple(t for t in targets.split(",") if t) if targets else d.cni_bin_target_dirs
            ),
            run_dir=env.get("CNI_AGENT_RUN_DIR") or d.run_dir,
            plugin_log_level=(
                plugin_level_in(env.get("LOG_LEVEL", ""))
                or env.get("PLUGIN_LOG_LEVEL")
                or d.plugin_log_level
            ),
            ambient_enabled=env_bool(env, "AMBIENT_ENABLED", d.ambient_enabled),
            exclude_namespaces=env.get("EXCLUDE_NAMESPACES", d.exclude_namespaces),
            pod_namespace=env.get("POD_NAMESPACE") or d.pod_namespace,
            k8s_service_host=env.get("KUBERNETES_SERVICE_HOST", ""),
            k8s_service_port=env.get("KUBERNETES_SERVICE_PORT", ""),
            kube_ca_file=env.get("KUBE_CA_FILE") or d.kube_ca_file,
            skip_tls_verify=env_bool(env, "SKIP_TLS_VERIFY", d.skip_tls_verify),
            sa_token_file=env.get("SA_TOKEN_FILE") or d.sa_token_file,
            fallback_kubeconfig=env.get("KUBECONFIG", ""),
            enablement_selectors=enablement_selectors_from_env(env),
            istio_owned_config=owned,
            istio_owned_filename=owned_name,
            conf_group_read=env_bool(env, "CNI_CONF_GROUP_READ", d.conf_group_read),
            native_nftables=True if env_bool(env, "NATIVE_NFTABLES", False) else None,
        )


def plugin_level_in(spec: str) -> str:
    """The plugin's level from the agent's scoped ``LOG_LEVEL`` (pure): the last
    ``cni-plugin:<level>`` or ``all:<level>`` entry, as Istio's agent writes its
    ``cni-plugin`` scope's level into the plugin's config; "" when there is none (then
    ``PLUGIN_LOG_LEVEL``, the chart's ``logLevel``, applies). Malformed entries are left to
    the agent's own check, which refuses them in one line."""
    found = ""
    for entry in spec.split(","):
        scope, sep, level = entry.strip().partition(":")
        if sep and scope.strip().lower() in ("cni-plugin", "all") and level.strip():
            found = level.strip().lower()
    return "warn" if found == "warning" else found
