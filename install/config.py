"""The installer's settings, from the environment the DaemonSet gives it (Istio's names).

Paths are as the agent container sees them: the host's CNI dirs are mounted under
``/host``. ``exclude_namespaces`` stays the comma-separated string Istio renders into the
plugin entry. Invalid values raise :class:`ConfigError` naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from cni_plugin.constants import DEFAULT_RUN_DIR
from cni_plugin.env_flags import env_bool
from cni_plugin.errors import ConfigError

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
    # Repairs happen at most once per this many seconds (SPEC §7).
    min_repair_interval_s: float = 5.0
    plugin_binaries: tuple[str, ...] = field(default=("istio-cni",))

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> InstallConfig:
        d = cls()
        targets = env.get("CNI_BIN_TARGET_DIRS")
        chained = env_bool(env, "CHAINED_CNI_PLUGIN", d.chained)
        if not chained:
            raise ConfigError(
                "CHAINED_CNI_PLUGIN=false is not supported: ambient mode needs istio-cni "
                "chained after the primary CNI; set it to true"
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
            plugin_log_level=env.get("PLUGIN_LOG_LEVEL") or d.plugin_log_level,
            ambient_enabled=env_bool(env, "AMBIENT_ENABLED", d.ambient_enabled),
            exclude_namespaces=env.get("EXCLUDE_NAMESPACES", d.exclude_namespaces),
            pod_namespace=env.get("POD_NAMESPACE") or d.pod_namespace,
            k8s_service_host=env.get("KUBERNETES_SERVICE_HOST", ""),
            k8s_service_port=env.get("KUBERNETES_SERVICE_PORT", ""),
            kube_ca_file=env.get("KUBE_CA_FILE") or d.kube_ca_file,
            skip_tls_verify=env_bool(env, "SKIP_TLS_VERIFY", d.skip_tls_verify),
            sa_token_file=env.get("SA_TOKEN_FILE") or d.sa_token_file,
            fallback_kubeconfig=env.get("KUBECONFIG", ""),
        )
