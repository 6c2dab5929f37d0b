"""Whether a plugin ``/cmdadd`` may enrol what it names: nothing in the request is trusted.

Anything that can write to ``pluginevent.sock`` can send a request, so before a single rule
is installed the request must name, for a pod of *this* node, a network namespace that is
that pod's (SPEC §3, issue 14.4). Refusals are :class:`AdmissionRefused` (answered 400 with
the reason; nothing is enrolled). The rules, in order:

- the pod is a pod of this node (the informer lists only those; a pod read from the API
  because the informer has not seen it yet must be bound to this node);
- the namespace was opened as a network namespace without blocking and is not the host's
  (:class:`node_agent.netns_finder.HostCheckedOpener`), nor the agent's own;
- no *other* pod holds it: not another cached (enrolled) pod, not another pod whose
  processes live in it (a /proc walk, as the finder does);
- every IP of the request is a unicast address assigned inside that namespace, and no other
  pod of this node has it. The pod's API IPs are not the authority: a new pod has none yet
  (the plugin's ADD races the informer, which learns the IP only after the ADD), and a
  re-created sandbox's IPs differ from the old ones still in the API. The namespace itself
  is the ground truth the primary CNI just configured.

Pure decisions (:func:`foreign_ips`, :func:`bad_ips`) are free of I/O; the two edges are
Protocols: who lives in a namespace (the real one is the finder's walk) and which addresses
a namespace holds (:class:`NamespaceAddresses`, read on a short-lived thread inside it).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable
from typing import Protocol

from cni_plugin.errors import IstioCniError
from cni_plugin.netns import Netns, NetnsId
from node_agent.netns_finder import FoundNetns
from node_agent.pod_cache import PodCache
from node_agent.resources import PodInfo

_AGENT_NETNS = "/proc/self/ns/net"


class AdmissionRefused(IstioCniError):
    """A ``/cmdadd`` request names a pod, namespace or IPs that do not belong together."""


class ProcessWalk(Protocol):
    """Pods' namespaces as found through /proc (the real one is :class:`NetnsFinder`)."""

    def scan(self, wanted: set[str] | None = None) -> dict[str, FoundNetns]: ...


class AddressReader(Protocol):
    def addresses(self, netns: Netns) -> set[str]: ...


def bad_ips(ips: Iterable[str]) -> list[str]:
    """The IPs that cannot be a pod's own (not unicast, loopback, link-local, unspecified)."""
    out = []
    for raw in ips:
        try:
            ip = ipaddress.ip_address(raw)
        except ValueError:
            out.append(raw)
            continue
        if (
            ip.is_multicast
            or ip.is_loopback
            or ip.is_link_local
            or ip.is_unspecified
            or (ip.version == 4 and ip == ipaddress.IPv4Address("255.255.255.255"))
        ):
            out.append(raw)
    return out


def foreign_ips(
    uid: str, ips: Iterable[str], pods: Iterable[PodInfo], cache: PodCache
) -> dict[str, str]:
    """IP -> the other live pod (``ns/name``) of this node that has it (its API IPs, or the
    IPs the agent enrolled it with). Pods terminal or being deleted do not count: their
    sandbox's IPs may already be released and handed to the new pod."""
    wanted = {_canonical(i) for i in ips}
    live = {
        p.uid: p
        for p in pods
        if p.uid != uid and not p.terminal and not p.deleting and not p.host_network
    }
    owners: dict[str, str] = {}
    for p in live.values():
        for ip in p.ips:
            if _canonical(ip) in wanted:
                owners[ip] = p.key
    for e in cache.entries():
        if e.uid in live:
            for ip in e.ips:
                if _canonical(ip) in wanted:
                    owners[ip] = f"{e.namespace}/{e.name}"
    return owners


def _canonical(ip: str) -> str:
    try:
        return str(ipaddress.ip_address(ip))
    except ValueError:
        return ip


class AddAdmission:
    """Checks one plugin ADD (see the module docstring); raises :class:`AdmissionRefused`."""

    def __init__(
        self,
        node_name: str,
        walk: ProcessWalk,
        addresses: AddressReader,
        agent_netns: str = _AGENT_NETNS,
    ) -> None:
        self.node_name = node_name
        self.walk = walk
        self.addresses = addresses
        self.agent_netns = agent_netns

    def check_pod(self, pod: PodInfo) -> None:
        if self.node_name and pod.node_name != self.node_name:
            raise AdmissionRefused(
                f"pod {pod.key} runs on node {pod.node_name or '(none)'}, not on this node "
                f"({self.node_name}): only this node's agent may enrol it"
            )

    def check_ips(
        self, pod: PodInfo, ips: tuple[str, ...], others: Iterable[PodInfo], cache: PodCache
    ) -> None:
        bad = bad_ips(ips)
        if bad:
            raise AdmissionRefused(
                f"IPs {', '.join(bad)} of pod {pod.key} are not unicast pod addresses"
            )
        taken = foreign_ips(pod.uid, ips, others, cache)
        if taken:
            which = ", ".join(f"{ip} (pod {owner})" for ip, owner in sorted(taken.items()))
            raise AdmissionRefused(
                f"IPs of pod {pod.key} belong to other pods of this node: {which}"
            )

    def check_netns(
        self, pod: PodInfo, netns: Netns, ips: tuple[str, ...], cache: PodCache
    ) -> None:
        where = netns.path
        try:
            st = os.stat(self.agent_netns)
        except OSError:
            st = None
        if st is not None and NetnsId(st.st_dev, st.st_ino) == netns.ident:
            raise AdmissionRefused(
                f"{where} is the node agent's own network namespace, not pod {pod.key}'s"
            )
        for e in cache.entries():
            if e.uid != pod.uid and e.netns is not None and e.netns.ident == netns.ident:
                raise AdmissionRefused(
                    f"{where} is the network namespace of pod {e.namespace}/{e.name}, "
                    f"not of pod {pod.key}"
                )
        for found in self.walk.scan().values():
            if found.uid != pod.uid and found.ident == netns.ident:
                raise AdmissionRefused(
                    f"{where} is the network namespace of pod uid {found.uid} (its process "
                    f"{found.pid} runs there), not of pod {pod.key}"
                )
        if ips:
            held = {_canonical(a) for a in self.addresses.addresses(netns)}
            missing = [ip for ip in ips if _canonical(ip) not in held]
            if missing:
                raise AdmissionRefused(
                    f"IPs {', '.join(missing)} are not assigned in {where}: it is not the "
                    f"namespace the runtime set up for pod {pod.key}"
                )


class NamespaceAddresses:
    """The addresses assigned inside a namespace, read on a short-lived thread in it (the
    thread's own ``/proc/thread-self/net`` view): IPv4 local routes of ``fib_trie``, IPv6
    ``if_inet6``."""

    def addresses(self, netns: Netns) -> set[str]:
        return netns.run(_read_addresses)


def _read_addresses() -> set[str]:
    out: set[str] = set()
    with open("/proc/thread-self/net/fib_trie") as f:
        out |= parse_fib_trie_locals(f.read())
    try:
        with open("/proc/thread-self/net/if_inet6") as f:
            out |= parse_if_inet6(f.read())
    except FileNotFoundError:
        pass  # IPv6 disabled in this kernel
    return out


def parse_fib_trie_locals(text: str) -> set[str]:
    """The addresses ``fib_trie`` lists as ``/32 host LOCAL`` (assigned to an interface)."""
    out: set[str] = set()
    last = ""
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("|--"):
            last = s[3:].strip()
        elif s.startswith("/32 host LOCAL") and last:
            out.add(last)
    return out


def parse_if_inet6(text: str) -> set[str]:
    out: set[str] = set()
    for line in text.splitlines():
        parts = line.split()
        if parts and len(parts[0]) == 32:
            try:
                out.add(str(ipaddress.IPv6Address(int(parts[0], 16))))
            except ValueError:
                continue
    return out
