"""What in-pod redirection to install: a pure, immutable description (no I/O)."""

from __future__ import annotations

from dataclasses import dataclass

from cni_plugin import constants as c
from cni_plugin.errors import RedirectionError

# Linux allows up to 15 bytes in an interface name; the names also reach rule text
# verbatim, so only characters no rule syntax gives a meaning to are accepted.
_IFNAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.@:")


@dataclass(frozen=True)
class RedirectSettings:
    """Knobs of in-pod redirection. The defaults produce Istio's ``default`` golden variant
    except DNS capture and IPv6, which callers set from config (``AMBIENT_DNS_CAPTURE``,
    ``AMBIENT_IPV6``).

    Per-pod fields (from the pod's annotations, see
    :mod:`cni_plugin.redirection.pod_overrides`): ``bypass_inbound``, ``dns_capture``
    (the node default unless the pod overrides it: this field is always the effective
    value) and ``virtual_interfaces`` (names whose inbound TCP is sent to ztunnel's
    outbound port, in the pod's order).

    ``ingress_connmark``: newest Istio's iptables rules set the connmark on ztunnel-marked
    packets in the ingress variant too (1.24's left that rule out with inbound capture);
    the iptables backend follows it when set. Istio's nftables rules always had the rule,
    so the nftables backend installs it either way. It changes nothing observable: in
    the ingress variant ztunnel makes no spoofed-source connections the connmark serves."""

    dns_capture: bool = True
    ipv6: bool = True
    bypass_inbound: bool = False
    virtual_interfaces: tuple[str, ...] = ()
    ingress_connmark: bool = False
    probe_snat_ipv4: str = c.HOST_PROBE_SNAT_IPV4
    probe_snat_ipv6: str = c.HOST_PROBE_SNAT_IPV6
    outbound_port: int = c.ZTUNNEL_OUTBOUND_PORT
    inbound_port: int = c.ZTUNNEL_INBOUND_PORT
    hbone_port: int = c.ZTUNNEL_HBONE_PORT
    dns_port: int = c.ZTUNNEL_DNS_PORT
    ztunnel_mark: int = c.ZTUNNEL_MARK
    connmark: int = c.CONNMARK
    mark_mask: int = c.MARK_MASK
    route_table: int = c.ROUTE_TABLE
    rule_priority: int = c.RULE_PRIORITY
    dns_ct_zone: int = c.DNS_CT_ZONE


def interface_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a (virtual) interface name in our rules, or None."""
    if not 0 < len(name) < 16:
        return f"interface name {name!r} must have 1 to 15 characters"
    if not set(name) <= _IFNAME_CHARS:
        return f"interface name {name!r} may only use the characters A-Z a-z 0-9 - _ . @ :"
    return None


def checked_virtual_interfaces(settings: RedirectSettings) -> tuple[str, ...]:
    """``settings.virtual_interfaces``, or :class:`RedirectionError` naming the bad one
    (every backend calls this before changing anything)."""
    for name in settings.virtual_interfaces:
        problem = interface_name_problem(name)
        if problem:
            raise RedirectionError(
                f"invalid virtual interface: {problem}; fix the pod annotation "
                f"{c.VIRTUAL_INTERFACES_ANNOTATION} (a comma-separated list of names)"
            )
    return settings.virtual_interfaces
