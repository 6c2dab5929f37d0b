"""The policy routing half of in-pod redirection (SPEC §6), through netlink (pyroute2).

Replies to ztunnel's spoofed-source inbound connections carry the restored connmark 0x111;
``ip rule fwmark 0x111/0xfff lookup 100 pref 32764`` sends them to table 100, whose only
route ``local 0.0.0.0/0 dev lo`` (``local ::/0`` for IPv6) delivers them locally, to ztunnel.

Every function here must run on a thread already inside the pod namespace
(:func:`cni_plugin.netns.run_in_netns`): the ``IPRoute`` netlink socket is created here, on
that thread, so it belongs to that namespace. Nothing here ever opens a namespace by path.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from cni_plugin.errors import RedirectionError
from cni_plugin.redirection.settings import RedirectSettings

RT_SCOPE_HOST = 254
RTN_LOCAL = 2
_EEXIST, _ENOENT, _ESRCH = 17, 2, 3


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


def _wanted(ipr: Any, settings: RedirectSettings) -> list[RouteItem]:
    items = [RouteItem("rule", socket.AF_INET), RouteItem("route", socket.AF_INET)]
    if settings.ipv6:
        items.append(RouteItem("rule", socket.AF_INET6))
        # SPEC: the IPv6 local route only when lo has IPv6 (it is absent when disabled).
        if _lo_has_ipv6(ipr):
            items.append(RouteItem("route", socket.AF_INET6))
    return items


def _lo_has_ipv6(ipr: Any) -> bool:
    lo = _lo_index(ipr)
    return any(a["family"] == socket.AF_INET6 for a in ipr.get_addr(index=lo))


def _lo_index(ipr: Any) -> int:
    found = ipr.link_lookup(ifname="lo")
    if not found:
        raise RedirectionError("the namespace has no loopback device: is it a pod namespace?")
    return int(found[0])


def _present(ipr: Any, item: RouteItem, s: RedirectSettings) -> int:
    """How many copies of ``item`` the namespace holds."""
    if item.kind == "rule":
        return sum(
            1
            for r in ipr.get_rules(family=item.family)
            if r.get("table") == s.route_table
            and r.get("fwmark") == s.connmark
            and r.get("fwmask") == s.mark_mask
            and r.get("priority") == s.rule_priority
        )
    return sum(
        1
        for r in ipr.get_routes(table=s.route_table, family=item.family)
        if r.get("table") == s.route_table and r["type"] == RTN_LOCAL and r["dst_len"] == 0
    )


def _add(ipr: Any, item: RouteItem, s: RedirectSettings) -> None:
    if item.kind == "rule":
        ipr.rule(
            "add",
            family=item.family,
            fwmark=s.connmark,
            fwmask=s.mark_mask,
            table=s.route_table,
            priority=s.rule_priority,
        )
        return
    dst = "::/0" if item.family == socket.AF_INET6 else "0.0.0.0/0"
    extra = {} if item.family == socket.AF_INET6 else {"scope": RT_SCOPE_HOST}
    ipr.route(
        "add",
        family=item.family,
        dst=dst,
        table=s.route_table,
        type="local",
        oif=_lo_index(ipr),
        **extra,
    )


def _delete(ipr: Any, item: RouteItem, s: RedirectSettings) -> None:
    try:
        if item.kind == "rule":
            ipr.rule(
                "del",
                family=item.family,
                fwmark=s.connmark,
                fwmask=s.mark_mask,
                table=s.route_table,
                priority=s.rule_priority,
            )
        else:
            dst = "::/0" if item.family == socket.AF_INET6 else "0.0.0.0/0"
            # The kernel matches the scope on delete: the IPv4 local route has scope host.
            extra = {} if item.family == socket.AF_INET6 else {"scope": RT_SCOPE_HOST}
            ipr.route(
                "del", family=item.family, dst=dst, table=s.route_table, type="local", **extra
            )
    except NetlinkError as e:
        if e.code not in (_ENOENT, _ESRCH):
            raise


def netlink() -> Any:
    """A route netlink socket in the calling thread's namespace (close it, or use ``with``).
    Callers doing several steps share one: creating an ``IPRoute`` costs milliseconds."""
    return IPRoute()


def install(settings: RedirectSettings, ipr: Any = None) -> None:
    """Add the rules and routes that are missing; on failure remove what this call added."""
    if ipr is None:
        with netlink() as own:
            return install(settings, own)
    added: list[RouteItem] = []
    try:
        for item in _wanted(ipr, settings):
            if _present(ipr, item, settings):
                continue
            _add(ipr, item, settings)
            added.append(item)
    except NetlinkError as e:
        for item in reversed(added):
            _delete(ipr, item, settings)
        raise RedirectionError(
            f"adding policy routing failed ({e}); nothing was left behind"
        ) from None


def uninstall(settings: RedirectSettings, ipr: Any = None) -> None:
    """Delete every copy of our rules and routes, in both families; absent is fine."""
    if ipr is None:
        with netlink() as own:
            return uninstall(settings, own)
    for fam in (socket.AF_INET, socket.AF_INET6):
        for kind in ("rule", "route"):
            item = RouteItem(kind, fam)
            for _ in range(_present(ipr, item, settings)):
                _delete(ipr, item, settings)


def check(settings: RedirectSettings, ipr: Any = None) -> tuple[list[str], list[str]]:
    """(missing, extra) policy rules and routes, as ``ip`` command lines."""
    if ipr is None:
        with netlink() as own:
            return check(settings, own)
    missing: list[str] = []
    extra: list[str] = []
    wanted = _wanted(ipr, settings)
    for fam in (socket.AF_INET, socket.AF_INET6):
        for kind in ("rule", "route"):
            item = RouteItem(kind, fam)
            n = _present(ipr, item, settings)
            want = 1 if item in wanted else 0
            if n < want:
                missing.append(item.describe(settings))
            extra += [item.describe(settings)] * max(0, n - want)
    return missing, extra
