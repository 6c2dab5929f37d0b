"""The behaviour table: every case is data, run against every backend in ``backends.py``.

A traffic case sets up redirection with some settings, makes one real connection (or DNS
query) in the topology, and names which listener must answer and, where it matters, which
original destination that listener must recover. Each case runs for IPv4 and IPv6.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DEFAULT: dict[str, Any] = {"dns_capture": True, "ipv6": True}
DNS_OFF: dict[str, Any] = {"dns_capture": False, "ipv6": True}
INGRESS: dict[str, Any] = {"dns_capture": True, "ipv6": True, "bypass_inbound": True}
# istio.io/reroute-virtual-interfaces=virt0: the pod's interface to the VM (topology.add_vm)
VIRTUAL: dict[str, Any] = {**DEFAULT, "virtual_interfaces": ("virt0",)}


@dataclass(frozen=True)
class TrafficCase:
    id: str
    what: str  # the behaviour, in words (SPEC §6)
    src: str  # "pod" (the app), "peer", "probe" (peer from the probe address), "ztunnel",
    # "vm" (a VM behind the pod's virtual interface virt0)
    dst: str  # "peer" | "pod" | "loopback"
    port: int
    expect: str  # name of the listener that must answer
    proto: str = "tcp"
    settings: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT))
    orig_dst: str | None = None  # "peer" | "pod": the answering listener must recover it
    vm_bridge: bool = False  # "vm": virt0 is a bridge, the VM on its port tap0 (KubeVirt)
    apply: bool = True  # False: control case without any redirection


TRAFFIC_CASES: list[TrafficCase] = [
    TrafficCase("control-no-redirection", "without redirection the peer answers itself",
                "pod", "peer", 80, "peer:80", apply=False),
    TrafficCase("outbound-captured", "1: pod -> peer:80 lands on 15001 with original dst",
                "pod", "peer", 80, "ztunnel:15001", orig_dst="peer"),
    TrafficCase("inbound-captured", "2: peer -> pod:8080 lands on 15006 with original dst",
                "peer", "pod", 8080, "ztunnel:15006", orig_dst="pod"),
    TrafficCase("hbone-direct", "3: peer -> pod:15008 reaches the HBONE listener directly",
                "peer", "pod", 15008, "ztunnel:15008", orig_dst="pod"),
    TrafficCase("dns-udp-captured", "4: UDP/53 to the peer lands on 15053 (capture on)",
                "pod", "peer", 53, "ztunnel:15053", proto="udp"),
    TrafficCase("dns-tcp-captured", "4: TCP/53 to the peer lands on 15053 (capture on)",
                "pod", "peer", 53, "ztunnel:15053", orig_dst="peer"),
    TrafficCase("dns-udp-off-reaches-peer", "4: UDP/53 reaches the peer (capture off)",
                "pod", "peer", 53, "peer-dns:53", proto="udp", settings=dict(DNS_OFF)),
    # With DNS capture off, TCP/53 is ordinary outbound TCP: Istio sends it to 15001.
    TrafficCase("dns-tcp-off-is-plain-outbound", "4: TCP/53 goes to 15001 (capture off)",
                "pod", "peer", 53, "ztunnel:15001", settings=dict(DNS_OFF), orig_dst="peer"),
    TrafficCase("ztunnel-mark-bypass", "5: SO_MARK 1337 from the pod goes straight to the peer",
                "ztunnel", "peer", 80, "peer:80"),
    TrafficCase("ztunnel-dns-upstream-bypass", "5/4: ztunnel's own (marked) UDP DNS reaches "
                "the peer", "ztunnel", "peer", 53, "peer-dns:53", proto="udp"),
    # Istio accepts `! -d 127.0.0.1/32 -o lo`: the app calling its own pod address.
    TrafficCase("pod-to-own-address-not-captured", "5: the app calling its own pod IP is not "
                "captured", "pod", "pod", 8080, "app:8080"),
    TrafficCase("loopback-not-captured", "5: 127.0.0.1 / ::1 traffic is never captured",
                "pod", "loopback", 9090, "app-lo:9090"),
    TrafficCase("probe-not-captured", "6: TCP from the probe address reaches the app",
                "probe", "pod", 8080, "app:8080"),
    TrafficCase("ingress-inbound-not-captured", "6: ingress variant: peer -> pod:8080 is not "
                "captured", "peer", "pod", 8080, "app:8080", settings=dict(INGRESS)),
    TrafficCase("ingress-outbound-captured", "6: ingress variant still captures outbound",
                "pod", "peer", 80, "ztunnel:15001", settings=dict(INGRESS), orig_dst="peer"),
    # Virtual interfaces (Istio 1.25+): what a VM in the pod sends is outbound for ztunnel:
    # `-i virt0 -p tcp -j REDIRECT --to-ports 15001` then RETURN, ahead of every other rule.
    TrafficCase("virtual-outbound-captured", "9: VM -> peer:80 via virt0 lands on 15001 "
                "with original dst", "vm", "peer", 80, "ztunnel:15001",
                settings=dict(VIRTUAL), orig_dst="peer"),
    TrafficCase("virtual-to-pod-is-outbound", "9: VM -> pod:8080 via virt0 is outbound "
                "(15001), not inbound (15006)", "vm", "pod", 8080, "ztunnel:15001",
                settings=dict(VIRTUAL), orig_dst="pod"),
    TrafficCase("virtual-hbone-port-not-exempt", "9: VM -> peer:15008 via virt0 still "
                "lands on 15001", "vm", "peer", 15008, "ztunnel:15001",
                settings=dict(VIRTUAL), orig_dst="peer"),
    TrafficCase("virtual-udp-dns-forwarded", "9: the VM's UDP/53 is not captured (TCP only; "
                "nat OUTPUT never sees forwarded packets)", "vm", "peer", 53, "peer-dns:53",
                proto="udp", settings=dict(VIRTUAL)),
    TrafficCase("virtual-bridge-outbound-captured", "9: a VM on a port of the bridge virt0: "
                "captured on the bridge, never on the port", "vm", "peer", 80, "ztunnel:15001",
                settings=dict(VIRTUAL), orig_dst="peer", vm_bridge=True),
    TrafficCase("virtual-bridge-to-pod-is-outbound", "9: VM on the bridge -> pod:8080 is "
                "outbound (15001)", "vm", "pod", 8080, "ztunnel:15001",
                settings=dict(VIRTUAL), orig_dst="pod", vm_bridge=True),
    TrafficCase("virtual-ingress-variant-captured", "9: the ingress variant keeps the "
                "virtual-interface redirect", "vm", "peer", 80, "ztunnel:15001",
                settings={**INGRESS, "virtual_interfaces": ("virt0",)}, orig_dst="peer"),
]  # fmt: skip
