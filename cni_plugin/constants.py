"""Constants of the interoperability contract (SPEC.md), defined once.

Ports, marks, routing numbers, chain names, labels, annotations and default paths that
Istio 1.24's istio-cni, ztunnel and istiod agree on. Stdlib-only: the plugin imports it.
Where C code (``cni_plugin/bpf``) needs a value, a test checks the C header agrees.
"""

from __future__ import annotations

# ``Final`` is only for type checkers (mypy treats any ``TYPE_CHECKING`` as true): importing
# ``typing`` at run time would add ~4 ms (``re``, ``enum``) to every plugin start.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

# Ports ztunnel listens on inside every enrolled pod's network namespace.
ZTUNNEL_OUTBOUND_PORT: Final = 15001
ZTUNNEL_INBOUND_PORT: Final = 15006
ZTUNNEL_HBONE_PORT: Final = 15008
ZTUNNEL_DNS_PORT: Final = 15053
DNS_PORT: Final = 53

# Marks: ztunnel sets SO_MARK 1337 (0x539) on its own sockets; captured inbound flows carry
# connmark 0x111 so replies to spoofed-source connections route back through table 100.
ZTUNNEL_MARK: Final = 0x539
CONNMARK: Final = 0x111
MARK_MASK: Final = 0xFFF
ROUTE_TABLE: Final = 100
RULE_PRIORITY: Final = 32764
DNS_CT_ZONE: Final = 1

# Addresses kubelet probes appear to come from after the host-side SNAT.
HOST_PROBE_SNAT_IPV4: Final = "169.254.7.127"
HOST_PROBE_SNAT_IPV6: Final = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"

# Chains.
CHAIN_PREROUTING: Final = "ISTIO_PRERT"
CHAIN_OUTPUT: Final = "ISTIO_OUTPUT"
CHAIN_POSTROUTING: Final = "ISTIO_POSTRT"

# Host-side probe ipsets.
PROBE_IPSET_V4: Final = "istio-inpod-probes-v4"
PROBE_IPSET_V6: Final = "istio-inpod-probes-v6"

# Labels and annotations.
DATAPLANE_MODE_LABEL: Final = "istio.io/dataplane-mode"
DATAPLANE_MODE_AMBIENT: Final = "ambient"
DATAPLANE_MODE_NONE: Final = "none"
SIDECAR_STATUS_ANNOTATION: Final = "sidecar.istio.io/status"
REDIRECTION_ANNOTATION: Final = "ambient.istio.io/redirection"
REDIRECTION_ENABLED: Final = "enabled"
REDIRECTION_PENDING: Final = "pending"
BYPASS_INBOUND_ANNOTATION: Final = "ambient.istio.io/bypass-inbound-capture"
# Istio 1.25+: per-pod DNS capture over the node default, and KubeVirt-style interfaces
# whose inbound TCP is treated as outbound (sent to ztunnel's 15001).
DNS_CAPTURE_ANNOTATION: Final = "ambient.istio.io/dns-capture"
VIRTUAL_INTERFACES_ANNOTATION: Final = "istio.io/reroute-virtual-interfaces"
ZTUNNEL_APP_LABEL: Final = "ztunnel"

# Default paths and names (agent side unless noted).
DEFAULT_RUN_DIR: Final = "/var/run/istio-cni"
PLUGIN_EVENT_SOCKET: Final = "pluginevent.sock"
PLUGIN_LOG_SOCKET: Final = "log.sock"
KUBECONFIG_NAME: Final = "istio-cni-kubeconfig"
DEFAULT_ZTUNNEL_SOCKET: Final = "/var/run/ztunnel/ztunnel.sock"
DEFAULT_EXCLUDED_NAMESPACES: Final = ("kube-system",)
DEFAULT_SYSTEM_NAMESPACE: Final = "istio-system"
DEFAULT_MONITORING_PORT: Final = 15014
DEFAULT_HEALTH_PORT: Final = 8000
PLUGIN_TYPE: Final = "istio-cni"
SUPPORTED_CNI_VERSIONS: Final = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
