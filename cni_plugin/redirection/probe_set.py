"""The host probe set's desired state: which entries to add and which to prune (pure).

Role: one rule for both host probe appliers (ipset, :mod:`node_agent.host_probe`, and
nftables sets, :mod:`cni_plugin.redirection.nftables_host_probe`), so a reconcile pass heals
them the same way. Invariant: an address the agent still holds for a pod (``keep``) is never
pruned, so a pod being enrolled while the pass runs keeps its probes.
"""

from __future__ import annotations

from collections.abc import Mapping


def probe_delta(
    members: Mapping[str, str], enrolled: Mapping[str, tuple[str, ...]], keep: set[str]
) -> tuple[dict[str, str], list[str]]:
    """(ip -> uid to add, ips to delete) that turn set ``members`` (ip -> uid comment)
    into exactly the addresses of ``enrolled`` pods (uid -> ips). An address in ``keep``
    (a pod the agent still holds, e.g. being enrolled right now) is never deleted."""
    wanted = {ip: uid for uid, ips in enrolled.items() for ip in ips}
    adds = {ip: uid for ip, uid in wanted.items() if members.get(ip) != uid}
    dels = sorted(ip for ip in members if ip not in wanted and ip not in keep)
    return adds, dels
