"""The policy routing half of in-pod redirection (SPEC §6), through raw rtnetlink.

Replies to ztunnel's spoofed-source inbound connections carry the restored connmark 0x111;
``ip rule fwmark 0x111/0xfff lookup 100 pref 32764`` sends them to table 100, whose only
route ``local 0.0.0.0/0 dev lo`` (``local ::/0`` for IPv6) delivers them locally, to ztunnel.

The requests go through the hand-packed :class:`~cni_plugin.rtnetlink.Rtnl` (tens of
microseconds each) rather than pyroute2, whose socket set-up and per-request event loop cost
about 1 ms per call and made these four items the largest part of a pod's apply.

Every function here must run on a thread already inside the pod namespace
(:func:`cni_plugin.netns.run_in_netns`): the netlink socket is created here, on that thread,
so it belongs to that namespace. Nothing here ever opens a namespace by path.
"""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass

from cni_plugin.errors import RedirectionError
from cni_plugin.redirection.settings import RedirectSettings
from cni_plugin.rtnetlink import FRA_FWMARK, FRA_FWMASK, FRA_PRIORITY, FRA_TABLE, Rtnl

# The loopback device is created with every network namespace and always has index 1.
LO_INDEX = 1


@dataclass(frozen=True)
class RouteItem:
    """One policy rule or route this module owns, for one family."""

    kind: str  # "rule" | "route"
    family: int  # socket.AF_INET | socket.AF_INET6

    def describe(self, s: RedirectSettings) -> str:
        v = "-6 " if self.family == socket.AF_INET6 else ""
        if self.kind == "rule":
            return (
                f"ip {v}rule fwmark 0x{s.connmark:x}/0x{s.mark_mask:x} "
                f"lookup {s.route_table} pref {s.rule_priority}"
            )
        dst = "::/0" if self.family == socket.AF_INET6 else "0.0.0.0/0"
        return f"ip {v}route local {dst} dev lo table {s.route_table}"


def describe_all(settings: RedirectSettings) -> list[str]:
    """What :func:`install` adds, as ``ip`` commands (for ``render``)."""
    fams = [socket.AF_INET, socket.AF_INET6] if settings.ipv6 else [socket.AF_INET]
    return [RouteItem(k, f).describe(settings) for f in fams for k in ("rule", "route")]


def _wanted(nl: Rtnl, settings: RedirectSettings) -> list[RouteItem]:
    items = [RouteItem("rule", socket.AF_INET), RouteItem("route", socket.AF_INET)]
    if settings.ipv6:
        items.append(RouteItem("rule", socket.AF_INET6))
        # SPEC: the IPv6 local route only when lo has IPv6 (it is absent when disabled).
        if nl.has_ipv6_address(LO_INDEX):
            items.append(RouteItem("route", socket.AF_INET6))
    return items


def _present(nl: Rtnl, item: RouteItem, s: RedirectSettings) -> int:
    """How many copies of ``item`` the namespace holds."""
    if item.kind == "rule":
        return sum(
            1
            for r in nl.rules(item.family)
            if r.get(FRA_TABLE) == s.route_table
            and r.get(FRA_FWMARK) == s.connmark
            and r.get(FRA_FWMASK) == s.mark_mask
            and r.get(FRA_PRIORITY) == s.rule_priority
        )
    return nl.local_routes(item.family, s.route_table)


def _add(nl: Rtnl, item: RouteItem, s: RedirectSettings) -> bool:
    """Add ``item``; False when an identical one was already there (the kernel's EEXIST
    answers the question a dump would, without the dump)."""
    try:
        if item.kind == "rule":
            nl.rule(True, item.family, s.connmark, s.mark_mask, s.route_table, s.rule_priority)
        else:
            nl.local_route(True, item.family, s.route_table, LO_INDEX)
    except FileExistsError:
        # A route EEXISTs for any default route of the table: make sure it is ours.
        if item.kind == "route" and not _present(nl, item, s):
            raise RedirectionError(
                f"table {s.route_table} already holds a default route that is not "
                f"{item.describe(s)!r}: remove it, the table is reserved for ztunnel"
            ) from None
        return False
    return True


def _delete(nl: Rtnl, item: RouteItem, s: RedirectSettings) -> None:
    try:
        if item.kind == "rule":
            nl.rule(False, item.family, s.connmark, s.mark_mask, s.route_table, s.rule_priority)
        else:
            nl.local_route(False, item.family, s.route_table, LO_INDEX)
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.ESRCH):
            raise


def netlink() -> Rtnl:
    """A route netlink socket in the calling thread's namespace (close it, or use ``with``);
    callers doing several steps share one."""
    return Rtnl()


def install(settings: RedirectSettings, nl: Rtnl | None = None) -> list[RouteItem]:
    """Add the rules and routes that are missing and return what this call added (for
    :func:`undo`); on failure remove what this call added and raise RedirectionError."""
    if nl is None:
        with netlink() as own:
            return install(settings, own)
    added: list[RouteItem] = []
    try:
        for item in _wanted(nl, settings):
            if _add(nl, item, settings):
                added.append(item)
    except (OSError, RedirectionError) as e:
        undo(added, settings, nl)
        if isinstance(e, RedirectionError):
            raise
        raise RedirectionError(
            f"adding policy routing failed ({e}); nothing was left behind"
        ) from None
    return added


def undo(added: list[RouteItem], settings: RedirectSettings, nl: Rtnl) -> None:
    """Remove exactly the items an :func:`install` call reported adding, newest first."""
    for item in reversed(added):
        _delete(nl, item, settings)


def uninstall(settings: RedirectSettings, nl: Rtnl | None = None) -> None:
    """Delete every copy of our rules and routes, in both families; absent is fine."""
    if nl is None:
        with netlink() as own:
            return uninstall(settings, own)
    for fam in (socket.AF_INET, socket.AF_INET6):
        for kind in ("rule", "route"):
            item = RouteItem(kind, fam)
            for _ in range(_present(nl, item, settings)):
                _delete(nl, item, settings)


def check(settings: RedirectSettings, nl: Rtnl | None = None) -> tuple[list[str], list[str]]:
    """(missing, extra) policy rules and routes, as ``ip`` command lines."""
    if nl is None:
        with netlink() as own:
            return check(settings, own)
    missing: list[str] = []
    extra: list[str] = []
    wanted = _wanted(nl, settings)
    for fam in (socket.AF_INET, socket.AF_INET6):
        for kind in ("rule", "route"):
            item = RouteItem(kind, fam)
            n = _present(nl, item, settings)
            want = 1 if item in wanted else 0
            if n < want:
                missing.append(item.describe(settings))
            extra += [item.describe(settings)] * max(0, n - want)
    return missing, extra
