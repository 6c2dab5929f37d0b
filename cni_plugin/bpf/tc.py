"""tc clsact attachment of our programs (over :class:`~cni_plugin.rtnetlink.Rtnl`).

Must run on a thread already inside the pod namespace, with an ``Rtnl`` made there. Our
filters are recognised by kind ``bpf``, priority :data:`PRIO` and a program name starting
with ``istio_``; bcc does not track tc filters, so detaching is always explicit.
"""

from __future__ import annotations

from dataclasses import dataclass

from cni_plugin.rtnetlink import Link, Rtnl

INGRESS = "ingress"
EGRESS = "egress"
PARENTS = {INGRESS: 0xFFFFFFF2, EGRESS: 0xFFFFFFF3}
PRIO = 1  # run first; our programs answer "not mine" with TC_ACT_UNSPEC, so others still run
HANDLE = 1
ARPHRD_ETHER = 1
ARPHRD_LOOPBACK = 772


@dataclass(frozen=True)
class Attached:
    """One of our filters as the kernel lists it."""

    ifindex: int
    ifname: str
    direction: str
    prog_name: str
    prog_id: int

    @property
    def key(self) -> tuple[int, str, str, int]:
        return (self.ifindex, self.direction, self.prog_name, self.prog_id)


def pod_interfaces(links: list[Link]) -> tuple[list[tuple[int, str]], list[str]]:
    """(index, name) of every Ethernet interface but lo, and the names of those skipped.

    Ports of a bridge (or bond) are left out: what they carry reaches IP on their master,
    which is steered instead, as iptables (no br_netfilter) only sees it there too. A VM's
    tap port of a KubeVirt bridge must not hand the VM's SYNs to 15006 before the
    bridge's own (virtual-interface) program sees them."""
    chosen: list[tuple[int, str]] = []
    skipped: list[str] = []
    for link in links:
        if link.link_type == ARPHRD_LOOPBACK or link.master:
            continue
        if link.link_type == ARPHRD_ETHER:
            chosen.append((link.index, link.name))
        else:
            skipped.append(link.name)
    return chosen, skipped


def attach(nl: Rtnl, ifindex: int, direction: str, prog_fd: int, prog_name: str) -> None:
    """Add, or atomically replace, our filter on ``ifindex`` in ``direction``."""
    nl.replace_bpf_filter(ifindex, PARENTS[direction], PRIO, HANDLE, prog_fd, prog_name)


def detach(nl: Rtnl, ifindex: int, direction: str) -> None:
    nl.del_filter(ifindex, PARENTS[direction], PRIO, HANDLE)


def ours(nl: Rtnl, links: list[Link] | None = None) -> list[Attached]:
    """Every filter of ours in the namespace, on any interface and direction."""
    found: list[Attached] = []
    for link in nl.links() if links is None else links:
        for direction in (INGRESS, EGRESS):
            for f in nl.filters(link.index, PARENTS[direction]):
                if f.kind == "bpf" and f.prio == PRIO and f.name.startswith("istio_"):
                    found.append(Attached(link.index, link.name, direction, f.name, f.prog_id))
    return found


def remaining_filters(nl: Rtnl, ifindex: int) -> int:
    return sum(len(nl.filters(ifindex, PARENTS[d])) for d in (INGRESS, EGRESS))
