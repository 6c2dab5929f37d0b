"""The protocol every redirection backend implements (iptables, nftables, eBPF).

Invariants every implementation keeps (and the shared behaviour table checks):
- ``apply`` is atomic: on failure nothing it added remains, and it raises
  :class:`~cni_plugin.errors.RedirectionError`; applying twice changes nothing.
- ``remove`` deletes exactly what ``apply`` added (chains, jumps, rules, routes, programs,
  pinned objects) and nothing else; removing what is absent is not an error.
- ``check`` never changes anything.
- Namespaces are entered with :mod:`cni_plugin.netns` (never created, never the host's).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from cni_plugin.redirection.settings import RedirectSettings


@dataclass(frozen=True)
class CheckReport:
    """What ``check`` found: items ``apply`` would install that are absent, and items of
    ours present that ``apply`` would not install. Items are human-readable lines."""

    missing: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.missing and not self.extra


class PodRedirection(Protocol):
    """Installs, removes and verifies in-pod redirection inside one network namespace: the
    part of a backend the node agent's enrollment calls."""

    name: str

    def apply(self, netns_path: str, settings: RedirectSettings) -> None: ...

    def remove(self, netns_path: str, settings: RedirectSettings) -> None: ...

    def check(self, netns_path: str, settings: RedirectSettings) -> CheckReport: ...


class RedirectionBackend(PodRedirection, Protocol):
    """A whole backend: the in-pod operations plus what they would install, as text."""

    def render(self, settings: RedirectSettings) -> str:
        """Human-readable text of what ``apply`` would install (rules, programs, routes)."""
        ...
