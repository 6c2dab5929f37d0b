"""Can the node use IPv6? Asked once at start, when ``AMBIENT_IPV6`` is on.

A kernel booted with ``ipv6.disable=1`` has no ``/proc/sys/net/ipv6`` at all, and a node
whose namespace has ``net.ipv6.conf.all.disable_ipv6=1`` refuses IPv6 routes and addresses:
in both cases the IPv6 half of the redirection cannot work, and insisting on it would fail
every pod. The agent then runs IPv4 only and says so in one warning line, as Istio does.
``/proc/sys/net`` shows the namespace of the thread that opens it, so the node namespace
(when it is not the agent's own) is read from a short-lived thread inside it.
"""

from __future__ import annotations

from cni_plugin.netns import run_in_netns

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
