"""A pod's virtual interfaces in the eBPF backend (``istio.io/reroute-virtual-interfaces``).

Role: what Istio's ``-i IF -p tcp -j REDIRECT --to-ports 15001`` / ``RETURN`` rules do for
a VM inside the pod, done by ``istio_virt_ingress`` on those interfaces' tc ingress
(instead of ``istio_ingress``). REDIRECT sends to the receiving interface's own address,
which differs per pod, so each such pod has its own ``virt`` map (ifindex -> the
interface's first IPv4 and first global IPv6 address) and its own load of the program;
both are pinned in the pod's directory and go with it. Pods without virtual interfaces
are unaffected (nothing is loaded for them).

Invariants: only Ethernet interfaces are steered (the programs read an Ethernet header),
as everywhere in this backend; a named interface the pod does not have is skipped and
named in ``check``'s notes. Addresses are read when ``apply`` runs; ``check`` reports an
address changed since as missing, and the next ``apply`` re-attaches.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

from cni_plugin.bpf import pod, programs, syscall, tc
from cni_plugin.bpf.image import VIRT_PROGRAM, ProgramImage
from cni_plugin.redirection.settings import RedirectSettings, checked_virtual_interfaces
from cni_plugin.rtnetlink import Link, Rtnl

IFA_F_SECONDARY = 0x01
IFA_F_TENTATIVE = 0x40
RT_SCOPE_UNIVERSE = 0
VIRT_MAP = "virt"

Addresses = dict[int, tuple[str | None, str | None]]


def interfaces(links: list[Link], settings: RedirectSettings) -> dict[int, str]:
    """ifindex -> name of the settings' virtual interfaces this namespace has, among the
    ones the backend attaches to (Ethernet, not a bridge port)."""
    wanted = set(checked_virtual_interfaces(settings))
    steered = dict(tc.pod_interfaces(links)[0])
    return {idx: name for idx, name in steered.items() if name in wanted}


def notes(links: list[Link], settings: RedirectSettings) -> list[str]:
    """``check`` notes: named virtual interfaces the namespace lacks (or not Ethernet)."""
    have = set(interfaces(links, settings).values())
    absent = [n for n in settings.virtual_interfaces if n not in have]
    return (
        [
            "virtual interfaces not redirected (absent, not Ethernet or a bridge port): "
            + ", ".join(absent)
        ]
        if absent
        else []
    )


def describe(settings: RedirectSettings, pods: str) -> list[str]:
    """``render`` lines for the settings' virtual interfaces."""
    if not settings.virtual_interfaces:
        return []
    return [
        f"on virtual interfaces {','.join(settings.virtual_interfaces)}: ingress filter "
        f"{VIRT_PROGRAM} instead of istio_ingress (TCP to the interface's own address, port "
        f"15001), loaded per pod over its map {pods}/virt (ifindex -> that address)"
    ]


def check(
    nl: Rtnl, links: list[Link], directory: Path, settings: RedirectSettings
) -> tuple[dict[int, int], list[str]]:
    """(ifindex -> the pinned ``istio_virt_ingress`` id each virtual interface should
    carry, what is missing: the pinned map not holding the interfaces' current addresses)."""
    addrs = addresses(nl, links, settings)
    virt_id = pod.pinned_prog_id(directory, VIRT_PROGRAM) or 0
    missing: list[str] = []
    if not pinned_addresses_match(directory, addrs):
        missing.append(f"virtual interface addresses {addrs} in {directory / VIRT_MAP}")
    return dict.fromkeys(addrs, virt_id), missing


def addresses(nl: Rtnl, links: list[Link], settings: RedirectSettings) -> Addresses:
    """ifindex -> (IPv4, IPv6) that REDIRECT would send to on each virtual interface."""
    out: Addresses = {}
    for idx in interfaces(links, settings):
        v4 = [a for a, _s, f in nl.addresses(idx, socket.AF_INET) if not f & IFA_F_SECONDARY]
        v6 = [
            a
            for a, scope, f in nl.addresses(idx, socket.AF_INET6)
            if scope == RT_SCOPE_UNIVERSE and not f & IFA_F_TENTATIVE
        ]
        out[idx] = (v4[0] if v4 else None, v6[0] if v6 and settings.ipv6 else None)
    return out


def load(
    img: ProgramImage, shared: programs.Pinned, pin_root: Path, addrs: Addresses
) -> programs.Pinned:
    """The pod's ``virt`` map and ``istio_virt_ingress`` (close them once pinned)."""
    node = programs.open_node(img, pin_root)
    try:
        return programs.virt_objects(img, shared, node, addrs)
    finally:
        node.close()


def pinned_addresses_match(directory: Path, addrs: Addresses) -> bool:
    """Whether the pod's pinned ``virt`` map holds exactly ``addrs`` (no pin: ``addrs`` is
    empty)."""
    path = directory / VIRT_MAP
    if not path.exists():
        return not addrs
    try:
        fd = syscall.obj_get(str(path))
    except OSError:
        return False
    try:
        want = {i: programs.virt_value(a4, a6) for i, (a4, a6) in addrs.items()}
        return programs.virt_entries(fd) == want
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
