"""The SPEC §6 policy route, installed through :class:`~cni_plugin.bpf.netlink.Rtnl`.

The same rule and routes as :mod:`cni_plugin.redirection.policy_routes` (whose ``check``
and ``describe_all`` stay the single description of them), added and removed with
hand-packed netlink because pyroute2 alone would cost more than the rest of a pod's attach.
For the eBPF backend the route also makes packets that ``istio_egress`` turns back into lo
(marked 0x111) local, whatever their destination.
"""

from __future__ import annotations

import errno
import socket

from cni_plugin.bpf.netlink import FRA_FWMARK, FRA_FWMASK, FRA_PRIORITY, FRA_TABLE, Rtnl
from cni_plugin.redirection.settings import RedirectSettings

LO_INDEX = 1


def _families(nl: Rtnl, s: RedirectSettings) -> list[tuple[int, bool]]:
    """(family, with its local route) pairs apply wants."""
    fams: list[tuple[int, bool]] = [(socket.AF_INET, True)]
    if s.ipv6:
        fams.append((socket.AF_INET6, nl.has_ipv6_address(LO_INDEX)))
    return fams


def _rule_count(nl: Rtnl, family: int, s: RedirectSettings) -> int:
    return sum(
        1
        for r in nl.rules(family)
        if r.get(FRA_TABLE) == s.route_table
        and r.get(FRA_FWMARK) == s.connmark
        and r.get(FRA_FWMASK) == s.mark_mask
        and r.get(FRA_PRIORITY) == s.rule_priority
    )


def install(nl: Rtnl, s: RedirectSettings) -> list[tuple[str, int]]:
    """Add what is missing (an existing identical rule or route answers EEXIST, so no dump
    is needed); returns what this call added, for undo."""
    added: list[tuple[str, int]] = []
    try:
        for fam, with_route in _families(nl, s):
            try:
                nl.rule(True, fam, s.connmark, s.mark_mask, s.route_table, s.rule_priority)
                added.append(("rule", fam))
            except FileExistsError:
                pass
            if with_route:
                try:
                    nl.local_route(True, fam, s.route_table, LO_INDEX)
                    added.append(("route", fam))
                except FileExistsError:
                    pass
    except OSError:
        undo(nl, s, added)
        raise
    return added


def undo(nl: Rtnl, s: RedirectSettings, added: list[tuple[str, int]]) -> None:
    for kind, fam in reversed(added):
        _delete(nl, s, kind, fam)


def uninstall(nl: Rtnl, s: RedirectSettings) -> None:
    """Delete every copy of the rule and route, in both families; absent is fine."""
    for fam in (socket.AF_INET, socket.AF_INET6):
        for _ in range(_rule_count(nl, fam, s)):
            _delete(nl, s, "rule", fam)
        for _ in range(nl.local_routes(fam, s.route_table)):
            _delete(nl, s, "route", fam)


def _delete(nl: Rtnl, s: RedirectSettings, kind: str, fam: int) -> None:
    try:
        if kind == "rule":
            nl.rule(False, fam, s.connmark, s.mark_mask, s.route_table, s.rule_priority)
        else:
            nl.local_route(False, fam, s.route_table, LO_INDEX)
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.ESRCH):
            raise
