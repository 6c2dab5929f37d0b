"""Whether a pod is redirected into the mesh: the one predicate (SPEC §2).

Pure and stdlib-only: the agent and the per-pod CNI plugin call the same function, so they
can never disagree. Inputs are plain mappings taken from the pod and its namespace.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from cni_plugin import constants as c


class Decision(StrEnum):
    """Why a pod is or is not redirected (the reason is shown to operators)."""

    AMBIENT = "ambient"
    NOT_LABELLED = "neither the pod nor its namespace is labelled ambient"
    OPTED_OUT = "pod label istio.io/dataplane-mode=none"
    SIDECAR = "pod has a sidecar (sidecar.istio.io/status)"
    HOST_NETWORK = "pod uses the host network"
    EXCLUDED_NAMESPACE = "namespace is excluded"
    ZTUNNEL = "pod is ztunnel itself"

    @property
    def enabled(self) -> bool:
        return self is Decision.AMBIENT


@dataclass(frozen=True)
class PodFacts:
    """The parts of a pod and its namespace the predicate reads."""

    namespace: str
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    host_network: bool = False
    namespace_labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class EnablementPolicy:
    """Node-wide settings: excluded namespaces and where ztunnel runs."""

    excluded_namespaces: Collection[str] = c.DEFAULT_EXCLUDED_NAMESPACES
    ztunnel_namespace: str = c.DEFAULT_SYSTEM_NAMESPACE


def decide(pod: PodFacts, policy: EnablementPolicy = EnablementPolicy()) -> Decision:
    """The first reason that rules the pod out, or :attr:`Decision.AMBIENT`."""
    mode = pod.labels.get(c.DATAPLANE_MODE_LABEL)
    if mode == c.DATAPLANE_MODE_NONE:
        return Decision.OPTED_OUT
    if pod.namespace in policy.excluded_namespaces:
        return Decision.EXCLUDED_NAMESPACE
    if pod.host_network:
        return Decision.HOST_NETWORK
    if c.SIDECAR_STATUS_ANNOTATION in pod.annotations:
        return Decision.SIDECAR
    if pod.namespace == policy.ztunnel_namespace and pod.labels.get("app") == c.ZTUNNEL_APP_LABEL:
        return Decision.ZTUNNEL
    ns_mode = pod.namespace_labels.get(c.DATAPLANE_MODE_LABEL)
    if mode != c.DATAPLANE_MODE_AMBIENT and ns_mode != c.DATAPLANE_MODE_AMBIENT:
        return Decision.NOT_LABELLED
    return Decision.AMBIENT


def bypass_inbound(annotations: Mapping[str, str]) -> bool:
    """True when the pod asks for the ingress variant (no inbound capture)."""
    return annotations.get(c.BYPASS_INBOUND_ANNOTATION, "").lower() == "true"
