"""Whether a pod is redirected into the mesh: the one predicate (SPEC §2, §9).

Pure and stdlib-only: the agent and the per-pod CNI plugin call the same function, so they
can never disagree. Inputs are plain mappings taken from the pod and its namespace.

Which pods opt in is said by *enablement selectors*, as newer Istio has them
(``ambient.enablementSelectors`` / ``AMBIENT_ENABLEMENT_SELECTOR`` / plugin
``enablement_selectors``; ``cni/pkg/util/enablement_selector.go``): a list of
(pod selector, namespace selector) pairs; a pod is selected when both selectors of any one
pair match its labels and its namespace's labels. :data:`DEFAULT_SELECTORS` is Istio's chart
default and says exactly the 1.24 rule: the pod labelled ambient, or its namespace labelled
ambient and the pod not labelled ``none``. Whatever the selectors say, host-network pods,
sidecar pods, excluded namespaces and ztunnel itself are never redirected (Istio checks the
first two in the selector match and the excluded namespaces beside it).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from cni_plugin import constants as c
from cni_plugin import label_selector
from cni_plugin.errors import ConfigError
from cni_plugin.label_selector import LabelSelector, Requirement

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only (the plugin imports this module)
    from typing import Any


class Decision(StrEnum):
    """Why a pod is or is not redirected (the reason is shown to operators)."""

    AMBIENT = "ambient"
    NOT_LABELLED = "neither the pod nor its namespace is labelled ambient"
    NOT_SELECTED = "no ambient enablement selector matches the pod and its namespace"
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
class EnablementSelector:
    """One entry of the list: both selectors must match (an empty one matches all)."""

    pod: LabelSelector = field(default_factory=LabelSelector)
    namespace: LabelSelector = field(default_factory=LabelSelector)

    def matches(self, pod_labels: Mapping[str, str], ns_labels: Mapping[str, str]) -> bool:
        return self.pod.matches(pod_labels) and self.namespace.matches(ns_labels)

    def to_json(self) -> dict[str, Any]:
        """Istio's encoding (``podSelector`` and ``namespaceSelector`` always present)."""
        return {"podSelector": self.pod.to_json(), "namespaceSelector": self.namespace.to_json()}


_AMBIENT = LabelSelector(match_labels=((c.DATAPLANE_MODE_LABEL, c.DATAPLANE_MODE_AMBIENT),))
DEFAULT_SELECTORS: tuple[EnablementSelector, ...] = (
    EnablementSelector(pod=_AMBIENT),
    EnablementSelector(
        pod=LabelSelector(
            match_expressions=(
                Requirement(c.DATAPLANE_MODE_LABEL, "NotIn", (c.DATAPLANE_MODE_NONE,)),
            )
        ),
        namespace=_AMBIENT,
    ),
)


def parse_selectors(raw: Any, where: str) -> tuple[EnablementSelector, ...]:
    """The list from its decoded JSON/YAML form (``None`` = an empty list, as Istio reads
    an empty setting: no pod is selected). Raises :class:`ConfigError` naming ``where``."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(
            f"{where}: must be a list of {{podSelector, namespaceSelector}} entries, "
            f"got {type(raw).__name__}"
        )
    out = []
    for i, item in enumerate(raw):
        at = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{at}: each entry is a mapping with podSelector/namespaceSelector")
        unknown = sorted(set(item) - {"podSelector", "namespaceSelector"})
        if unknown:
            raise ConfigError(
                f"{at}: unknown field(s) {', '.join(map(str, unknown))}: "
                "use podSelector, namespaceSelector"
            )
        out.append(
            EnablementSelector(
                pod=label_selector.parse(item.get("podSelector"), f"{at}.podSelector"),
                namespace=label_selector.parse(
                    item.get("namespaceSelector"), f"{at}.namespaceSelector"
                ),
            )
        )
    return tuple(out)


def selectors_to_json(selectors: Sequence[EnablementSelector]) -> list[dict[str, Any]]:
    return [s.to_json() for s in selectors]


def namespace_matches(
    selectors: Sequence[EnablementSelector], ns_labels: Mapping[str, str]
) -> tuple[bool, ...]:
    """Which non-empty namespace selectors match: when this changes for a namespace, its
    pods must be judged again (Istio re-enqueues them when "any matches" flips; this also
    catches a namespace moving from one selector to another)."""
    return tuple(s.namespace.matches(ns_labels) for s in selectors if not s.namespace.empty)


@dataclass(frozen=True)
class EnablementPolicy:
    """Node-wide settings: the enablement selectors, excluded namespaces, where ztunnel runs."""

    excluded_namespaces: Collection[str] = c.DEFAULT_EXCLUDED_NAMESPACES
    ztunnel_namespace: str = c.DEFAULT_SYSTEM_NAMESPACE
    selectors: tuple[EnablementSelector, ...] = DEFAULT_SELECTORS


def decide(pod: PodFacts, policy: EnablementPolicy = EnablementPolicy()) -> Decision:
    """The first reason that rules the pod out, or :attr:`Decision.AMBIENT`.

    The reasons come in the 1.24 order (an opted-out pod says so first); whether the pod
    is redirected is exactly Istio's: not host network, no sidecar, not in an excluded
    namespace, and selected."""
    mode = pod.labels.get(c.DATAPLANE_MODE_LABEL)
    selected = any(s.matches(pod.labels, pod.namespace_labels) for s in policy.selectors)
    if not selected and mode == c.DATAPLANE_MODE_NONE:
        return Decision.OPTED_OUT
    if pod.namespace in policy.excluded_namespaces:
        return Decision.EXCLUDED_NAMESPACE
    if pod.host_network:
        return Decision.HOST_NETWORK
    if c.SIDECAR_STATUS_ANNOTATION in pod.annotations:
        return Decision.SIDECAR
    if pod.namespace == policy.ztunnel_namespace and pod.labels.get("app") == c.ZTUNNEL_APP_LABEL:
        return Decision.ZTUNNEL
    if not selected:
        if policy.selectors == DEFAULT_SELECTORS:
            return Decision.NOT_LABELLED
        return Decision.NOT_SELECTED
    return Decision.AMBIENT


def bypass_inbound(annotations: Mapping[str, str]) -> bool:
    """True when the pod asks for the ingress variant (no inbound capture)."""
    return annotations.get(c.BYPASS_INBOUND_ANNOTATION, "").lower() == "true"
