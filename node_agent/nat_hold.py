"""Holding a pod's connection tracking and NAT while its redirection comes and goes (issue 19).

Two kernel facts, shown on this machine (``docs/reliability.md``) and true of Istio's own
iptables rules as much as of ours:

- A pod outside the mesh usually has no netfilter rules, so conntrack does not track its
  connections. When the redirection goes in, the next packet of a connection made before is
  seen as a *new* conntrack entry, and the nat rules (``REDIRECT`` to 15001/15006) send it,
  mid-stream, to ztunnel's listener, which answers with a reset: every open connection of a
  pod being enrolled is cut.
- When a namespace's last NAT user goes (the redirection removed), the kernel drops the NAT
  of every connection still using it: connections the pod had redirected to ztunnel (in
  flight, or long-lived) now send to their original address a conversation it never saw,
  and are reset.

The hold is one nftables table, ``inet istio-cni-nat-hold``: nat chains on the output and
prerouting hooks, each with a rule that never matches (``tcp dport 0``) but uses NAT, which is
all it takes to keep conntrack and NAT alive in the namespace. Enrolling a running pod with
open connections: hold, let them pass a packet (:data:`PRIME_S`: each gets a conntrack entry
with no NAT, which the redirection then leaves alone), install the rules, release (a pod
without an established connection is enrolled at once). Leaving:
hold, remove the rules, release once ztunnel's drain is over (:mod:`node_agent.departure`).

Best effort: a hold that cannot be placed only loses this protection (logged), never an
enrolment. A connection that sends nothing while the hold primes it (idle longer than
:data:`PRIME_S`) is still cut on enrolment.
"""

from __future__ import annotations

import logging

from cni_plugin.errors import IstioCniError
from cni_plugin.netns import run_in_netns

log = logging.getLogger("node_agent.nat_hold")

TABLE = "istio-cni-nat-hold"
PRIME_S = 0.5  # long enough for an active connection to pass a packet
_HOLD = (
    f"add table inet {TABLE}\n"
    f"flush table inet {TABLE}\n"
    f"add chain inet {TABLE} output {{ type nat hook output priority 100; }}\n"
    f"add chain inet {TABLE} prerouting {{ type nat hook prerouting priority 100; }}\n"
    # Never matches (no connection uses port 0), but a NAT rule keeps NAT and conntrack on.
    f"add rule inet {TABLE} output tcp dport 0 redirect to :1\n"
    f"add rule inet {TABLE} prerouting tcp dport 0 redirect to :1\n"
)
_RELEASE = f"delete table inet {TABLE}\n"


class NatHold:
    """``hold`` / ``release`` in a namespace (both idempotent)."""

    def hold(self, netns_path: str) -> None:
        self._nft(netns_path, _HOLD, "placing the conntrack/NAT hold")

    def open_connections(self, netns_path: str) -> int:
        """Established TCP connections in the namespace (what priming is for): none, and
        enrolment need not wait. Unreadable counts as some (prime, to be safe)."""

        def work() -> int:
            count = 0
            for name in ("tcp", "tcp6"):
                try:
                    with open(f"/proc/thread-self/net/{name}") as f:
                        rows = f.read().splitlines()[1:]
                except FileNotFoundError:  # no IPv6 in this kernel
                    continue
                count += sum(1 for r in rows if r.split()[3:4] == ["01"])  # ESTABLISHED
            return count

        try:
            return run_in_netns(netns_path, work)
        except (IstioCniError, OSError):
            return 1

    def release(self, netns_path: str) -> None:
        self._nft(netns_path, _RELEASE, "releasing the conntrack/NAT hold", missing_ok=True)

    @staticmethod
    def _nft(netns_path: str, script: str, what: str, missing_ok: bool = False) -> None:
        def work() -> tuple[int, str]:
            import nftables

            rc, _, err = nftables.Nftables().cmd(script)
            return int(rc), str(err)

        try:
            rc, err = run_in_netns(netns_path, work)
        except IstioCniError as e:
            rc, err = 1, str(e)
        except OSError as e:  # libnftables missing
            rc, err = 1, f"libnftables: {e}"
        if rc != 0 and not (missing_ok and "No such file" in err):
            log.warning(
                f"{what} failed; open connections may be reset",
                extra={"fields": {"netns": netns_path, "error": err.strip()[:200]}},
            )
