"""What in-pod redirection to install: a pure, immutable description (no I/O)."""

from __future__ import annotations

from dataclasses import dataclass

from cni_plugin import constants as c


@dataclass(frozen=True)
class RedirectSettings:
    """Knobs of in-pod redirection. The defaults produce Istio's ``default`` golden variant
    except DNS capture and IPv6, which callers set from config (``AMBIENT_DNS_CAPTURE``,
    ``AMBIENT_IPV6``)."""

    dns_capture: bool = True
    ipv6: bool = True
    bypass_inbound: bool = False
    # Leaving the mesh (ebpf): steer no new connection, keep steering the ones captured, until
    # ztunnel has drained them; the agent then removes the redirection. The netfilter
    # backends need no variant for this: conntrack carries captured connections, under the
    # agent's NAT hold (node_agent/nat_hold.py).
    draining: bool = False
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
