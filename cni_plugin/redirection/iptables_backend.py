"""The iptables redirection backend: Istio 1.24's exact rules plus policy routing.

``apply`` converges a pod namespace to exactly the rule set of the settings: when it is
already there nothing changes; when only part of ours is there (drift, other settings) ours
is removed first; then each family's rules are installed (atomic per table through the
applier) and the policy routes added. Any failure undoes every step already taken, so a
:class:`RedirectionError` always means the namespace holds nothing of ours.

Everything touching the namespace runs on one short-lived thread inside it
(:func:`cni_plugin.netns.run_in_netns`), which never creates a namespace and refuses the
host's own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol, TypeVar

from cni_plugin.errors import ConfigError, IstioCniError, RedirectionError
from cni_plugin.netns import run_in_netns
from cni_plugin.redirection import policy_routes
from cni_plugin.redirection.backend import CheckReport
from cni_plugin.redirection.iptables_rules import Family, RuleSet, families, inpod_rules
from cni_plugin.redirection.iptables_rules import render_inpod as render_rules
from cni_plugin.redirection.iptables_state import SavedTables, diff, parse_save
from cni_plugin.redirection.settings import RedirectSettings
from cni_plugin.rtnetlink import Rtnl

log = logging.getLogger(__name__)
T = TypeVar("T")

APPLIERS = ("iptables-restore", "python-iptables")
_HOST_NETNS = "/proc/self/ns/net"


class RuleApplier(Protocol):
    """Writes rule sets into the current thread's namespace (the kernel edge)."""

    name: str
    variant: str

    def describe(self) -> str: ...

    def save(self, family: Family) -> str:
        """``iptables-save`` text of the variant this applier writes to."""
        ...

    def save_all(self, families: list[Family]) -> list[str]:
        """``save`` of each family (concurrently where the applier can), in order."""
        ...

    def install_all(self, rulesets: list[RuleSet]) -> None:
        """``install`` of each rule set; on failure leave none of any of them."""
        ...

    def install(self, ruleset: RuleSet) -> None:
        """Install ``ruleset`` (our chains are absent); on failure leave none of it."""
        ...

    def uninstall(self, family: Family, saved: SavedTables) -> None:
        """Delete our chains and the jumps into them found in ``saved``."""
        ...


def make_applier(name: str, variant: str | None = None) -> RuleApplier:
    if name == "iptables-restore":
        from cni_plugin.redirection.iptables_restore import IptablesRestoreApplier

        return IptablesRestoreApplier(variant)
    if name == "python-iptables":
        if variant not in (None, "legacy"):
            raise ConfigError("python-iptables only drives legacy xtables: use variant legacy")
        from cni_plugin.redirection.python_iptables import PythonIptablesApplier

        return PythonIptablesApplier()
    raise ConfigError(f"unknown iptables applier {name!r}: choose one of {', '.join(APPLIERS)}")


class IptablesBackend:
    """:class:`~cni_plugin.redirection.backend.RedirectionBackend` over iptables."""

    name = "iptables"

    def __init__(
        self,
        applier: str | RuleApplier = "iptables-restore",
        variant: str | None = None,
        host_netns: str | None = _HOST_NETNS,
    ) -> None:
        self.applier = make_applier(applier, variant) if isinstance(applier, str) else applier
        self.host_netns = host_netns

    def render(self, settings: RedirectSettings) -> str:
        routes = "\n".join(f"# {line}" for line in policy_routes.describe_all(settings))
        return (
            f"{render_rules(settings)}\n"
            f"# policy routing, installed through netlink (not iptables-restore input):\n"
            f"{routes}"
        )

    def _run(self, netns_path: str, what: str, work: Callable[[], T]) -> T:
        try:
            return run_in_netns(netns_path, work, host_netns=self.host_netns)
        except IstioCniError:
            raise
        except Exception as e:  # netlink, subprocess, ctypes: one clear error, no traceback
            raise RedirectionError(f"{what} in {netns_path} failed: {e}") from None

    def _check_inside(self, settings: RedirectSettings, ipr: Rtnl | None = None) -> CheckReport:
        missing: list[str] = []
        extra: list[str] = []
        wanted = {f: inpod_rules(settings, f) for f in families(settings)}
        both = [Family.IPV4, Family.IPV6]
        for fam, text in zip(both, self.applier.save_all(both), strict=True):
            m, e = diff(wanted.get(fam, RuleSet(fam, ())), parse_save(text))
            missing += m
            extra += e
        m, e = policy_routes.check(settings, ipr)
        return CheckReport(
            tuple(missing + m), tuple(extra + e), (f"applier: {self.applier.describe()}",)
        )

    def _remove_inside(self, settings: RedirectSettings, ipr: Rtnl | None = None) -> None:
        both = [Family.IPV4, Family.IPV6]
        for fam, text in zip(both, self.applier.save_all(both), strict=True):
            saved = parse_save(text)
            if saved.holds_ours():
                self.applier.uninstall(fam, saved)
        policy_routes.uninstall(settings, ipr)

    def apply(self, netns_path: str, settings: RedirectSettings) -> None:
        def work() -> None:
            with policy_routes.netlink() as ipr:
                self._apply_inside(netns_path, settings, ipr)

        self._run(netns_path, "applying redirection", work)

    def _apply_inside(self, netns_path: str, settings: RedirectSettings, ipr: Rtnl) -> None:
        report = self._check_inside(settings, ipr)
        if report.ok:
            log.debug("redirection already in place", extra={"fields": {"netns": netns_path}})
            return
        if report.extra or len(report.missing) < self._item_count(settings):
            # Part of ours is there (drift or other settings): start from nothing.
            self._remove_inside(settings, ipr)
        try:
            self.applier.install_all([inpod_rules(settings, f) for f in families(settings)])
            policy_routes.install(settings, ipr)
        except BaseException as e:
            # Each step undoes itself; removing everything of ours also undoes the steps
            # that succeeded before the failing one.
            try:
                self._remove_inside(settings, ipr)
            except Exception as undo:
                log.error(
                    "undoing a failed apply failed: remove the redirection by hand",
                    extra={"fields": {"netns": netns_path, "error": str(undo)}},
                )
            if isinstance(e, RedirectionError):
                raise
            if isinstance(e, Exception):
                raise RedirectionError(f"installing redirection failed: {e}") from None
            raise
        log.info(
            "redirection applied",
            extra={"fields": {"netns": netns_path, "applier": self.applier.describe()}},
        )

    def _item_count(self, settings: RedirectSettings) -> int:
        """How many check items an empty namespace is missing (all of them)."""
        n = 0
        for fam in families(settings):
            rs = inpod_rules(settings, fam)
            n += len(rs.rules) + sum(len(rs.chains(t)) for t in rs.tables())
        return n + len(policy_routes.describe_all(settings))

    def remove(self, netns_path: str, settings: RedirectSettings) -> None:
        self._run(netns_path, "removing redirection", lambda: self._remove_inside(settings))

    def check(self, netns_path: str, settings: RedirectSettings) -> CheckReport:
        return self._run(netns_path, "checking redirection", lambda: self._check_inside(settings))
