"""The node's network namespace as the agent sees it: which one to enter, which xtables
variant it uses, whether it can do IPv6, and whether it still holds the iptables host probe
ipsets (native nftables migration). Asked once at start.

Which: ``node_netns`` (``NODE_NETNS``, or ``<proc_root>/1/ns/net`` with Istio's
``ALLOW_SWITCH_TO_HOST_NS``), normalised to ``""`` when it is the agent's own namespace (the
pod shares the host network namespace), so nothing enters anything needlessly.

xtables variant: detected where the node's rules are (kubelet's, kube-proxy's), from a
short-lived thread inside the node namespace when it is not ours; a pod that does not share
the host network namespace would otherwise judge by its own empty tables.

IPv6 (when ``AMBIENT_IPV6`` is on): a kernel booted with ``ipv6.disable=1`` has no
``/proc/sys/net/ipv6`` at all, and a node whose namespace has
``net.ipv6.conf.all.disable_ipv6=1`` refuses IPv6 routes and addresses: in both cases the
IPv6 half of the redirection cannot work, and insisting on it would fail every pod. The
agent then runs IPv4 only and says so in one warning line, as Istio does. ``/proc/sys/net``
shows the namespace of the thread that opens it, so the node namespace (when it is not the
agent's own) is read from a short-lived thread inside it.
"""

from __future__ import annotations

import subprocess

from cni_plugin import constants as c
from cni_plugin.errors import ConfigError
from cni_plugin.netns import netns_id, run_in_netns
from cni_plugin.redirection.iptables_restore import detect_variant

SELF_NETNS = "/proc/self/ns/net"

IPV6_SYSCTLS = "/proc/sys/net/ipv6"


def _unusable_here() -> str | None:
    try:
        with open(f"{IPV6_SYSCTLS}/conf/all/disable_ipv6", encoding="ascii") as f:
            disabled = f.read().strip() == "1"
    except FileNotFoundError:
        return "the kernel has no IPv6 (booted with ipv6.disable=1, or built without it)"
    except OSError as e:
        return f"IPv6 state unreadable ({e.strerror})"
    if disabled:
        return "IPv6 is disabled in the node's network namespace (net.ipv6.conf.all.disable_ipv6=1)"
    return None


def ipv6_unusable(node_netns: str = "") -> str | None:
    """Why IPv6 cannot be used in the node namespace (``""`` = our own), or None."""
    return run_in_netns(node_netns, _unusable_here) if node_netns else _unusable_here()


def node_namespace(path: str) -> str:
    """``path`` as the node namespace to enter, or ``""`` when it is the agent's own (the
    agent shares the host network namespace: nothing to enter, and entering our own
    namespace is refused anyway)."""
    if not path:
        return path
    try:
        node = netns_id(path)
    except OSError as e:
        raise ConfigError(
            f"cannot open the node's network namespace {path} ({e.strerror}): give the pod "
            "the host's /proc with SYS_PTRACE and SYS_ADMIN (the chart does), share the "
            "host network namespace (ambient.shareHostNetworkNamespace=true), or name the "
            "node's namespace in NODE_NETNS"
        ) from None
    return "" if node == netns_id(SELF_NETNS) else path


def xtables_variant(node_netns: str) -> tuple[str, str]:
    """(variant, reason) of the node namespace (``""`` = our own, detected once)."""
    if not node_netns:
        return detect_variant()
    return run_in_netns(node_netns, detect_variant.__wrapped__)


def iptables_probe_sets(node_netns: str) -> tuple[bool, str]:
    """(present, detail): whether the node namespace still holds the iptables host probe
    ipsets (``istio-inpod-probes-v4``/``-v6``), the artifact Istio's agent looks for before
    it uses native nftables. Unreadable (no ipset tool, no permission) counts as absent,
    with the reason in ``detail``, as Istio proceeds with nftables then."""
    argv = ["ipset", "list", "-n"]
    if node_netns:
        argv = ["nsenter", f"--net={node_netns}", "--", *argv]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"ipset sets unreadable ({e}): taken as absent"
    if r.returncode != 0:
        return False, f"ipset sets unreadable ({r.stderr.strip()}): taken as absent"
    found = sorted(set(r.stdout.split()) & {c.PROBE_IPSET_V4, c.PROBE_IPSET_V6})
    return bool(found), ", ".join(found) or "no istio probe ipset"
