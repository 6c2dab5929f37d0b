"""A pod's own redirection settings over the node's: Istio's pod-level traffic overrides.

Role: turn a pod's annotations into the per-pod fields of
:class:`~cni_plugin.redirection.settings.RedirectSettings`, with Istio's names and parsing
(its ``getPodLevelTrafficOverrides``). Pure: no I/O, no logging; what was ignored comes
back as ``problems`` for the caller to log with the pod's identity.

- ``ambient.istio.io/dns-capture``: Go ``strconv.ParseBool`` (``1 t T TRUE true True``,
  ``0 f F FALSE false False``). Present and valid, it replaces the node's DNS capture
  setting for this pod; absent or unparsable, the node's setting stands (Istio ignores an
  unparsable value with a warning).
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
    virtual_interfaces: tuple[str, ...] = ()
    problems: tuple[str, ...] = ()

    @classmethod
    def from_annotations(cls, annotations: Mapping[str, str]) -> PodOverrides:
        problems: list[str] = []
        dns: bool | None = None
        raw = annotations.get(c.DNS_CAPTURE_ANNOTATION)
        if raw is not None:
            dns = parse_go_bool(raw)
            if dns is None:
                problems.append(
                    f"annotation {c.DNS_CAPTURE_ANNOTATION}={raw!r} ignored: only boolean "
                    "values are supported (true/false); the node's DNS capture setting applies"
                )
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
        return cls(dns, tuple(virtual), tuple(problems))

    def applied_to(self, node: RedirectSettings) -> RedirectSettings:
        """``node`` with this pod's overrides in place (``dns_capture`` becomes the
        effective value; ``virtual_interfaces`` the pod's list)."""
        dns = node.dns_capture if self.dns_capture is None else self.dns_capture
        return replace(node, dns_capture=dns, virtual_interfaces=self.virtual_interfaces)


def pod_settings(node: RedirectSettings, annotations: Mapping[str, str]) -> RedirectSettings:
    """The settings for one pod: the node's, overridden by the pod's annotations."""
    return PodOverrides.from_annotations(annotations).applied_to(node)
