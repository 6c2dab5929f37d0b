"""A pod's own redirection settings over the node's: Istio's pod-level traffic overrides.

Role: turn a pod's annotations into the per-pod fields of
:class:`~cni_plugin.redirection.settings.RedirectSettings`, with Istio's names and parsing
(its ``getPodLevelTrafficOverrides``). Pure: no I/O, no logging; what was ignored comes
back as ``problems`` for the caller to log with the pod's identity.

- ``ambient.istio.io/dns-capture``: Go ``strconv.ParseBool`` (``1 t T TRUE true True``,
  ``0 f F FALSE false False``). Present and valid, it replaces the node's DNS capture
  setting for this pod; absent or unparsable, the node's setting stands (Istio ignores an
  unparsable value with a warning).
- ``ambient.istio.io/bypass-inbound-capture``: the same parsing (Istio reads it with the
  same helper), so ``"1"`` or ``"T"`` select the ingress variant too; absent or
  unparsable, inbound capture stays on.
- ``istio.io/reroute-virtual-interfaces``: a comma-separated list of interface names,
  each trimmed, empty items dropped, order kept. A name no kernel accepts is kept, so the
  backend refuses the pod with a clear error (as Istio's rule installation fails).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from cni_plugin import constants as c
from cni_plugin.redirection.settings import RedirectSettings, interface_name_problem

_GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_GO_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


def parse_go_bool(value: str) -> bool | None:
    """Go's ``strconv.ParseBool``: True, False, or None when Go would return an error
    (no trimming, no other spellings)."""
    if value in _GO_TRUE:
        return True
    if value in _GO_FALSE:
        return False
    return None


@dataclass(frozen=True)
class PodOverrides:
    """What a pod's annotations ask for; None/empty means "as the node says"."""

    dns_capture: bool | None = None
    bypass_inbound: bool | None = None
    virtual_interfaces: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()

    @classmethod
    def from_annotations(cls, annotations: Mapping[str, str]) -> PodOverrides:
        problems: list[str] = []
        dns = _boolean(annotations, c.DNS_CAPTURE_ANNOTATION, problems,
                       "the node's DNS capture setting applies")  # fmt: skip
        bypass = _boolean(annotations, c.BYPASS_INBOUND_ANNOTATION, problems,
                          "inbound capture stays on")  # fmt: skip
        virtual: list[str] = []
        for item in annotations.get(c.VIRTUAL_INTERFACES_ANNOTATION, "").split(","):
            name = item.strip()
            if not name:
                continue
            virtual.append(name)
            problem = interface_name_problem(name)
            if problem:
                problems.append(
                    f"annotation {c.VIRTUAL_INTERFACES_ANNOTATION}: {problem}; "
                    "the pod's redirection will be refused until it is fixed"
                )
        return cls(dns, bypass, tuple(virtual), tuple(problems))

    def applied_to(self, node: RedirectSettings) -> RedirectSettings:
        """``node`` with this pod's overrides in place (``dns_capture`` and
        ``bypass_inbound`` become the effective values; ``virtual_interfaces`` the pod's
        list)."""
        dns = node.dns_capture if self.dns_capture is None else self.dns_capture
        bypass = node.bypass_inbound if self.bypass_inbound is None else self.bypass_inbound
        return replace(node, dns_capture=dns, bypass_inbound=bypass,
                       virtual_interfaces=self.virtual_interfaces)  # fmt: skip


def _boolean(
    annotations: Mapping[str, str], name: str, problems: list[str], otherwise: str
) -> bool | None:
    raw = annotations.get(name)
    if raw is None:
        return None
    value = parse_go_bool(raw)
    if value is None:
        problems.append(
            f"annotation {name}={raw!r} ignored: only boolean values are supported "
            f"(true/false); {otherwise}"
        )
    return value


def pod_settings(node: RedirectSettings, annotations: Mapping[str, str]) -> RedirectSettings:
    """The settings for one pod: the node's, overridden by the pod's annotations."""
    return PodOverrides.from_annotations(annotations).applied_to(node)
