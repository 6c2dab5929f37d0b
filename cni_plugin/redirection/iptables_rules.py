"""The iptables rule model: settings in, ``iptables-restore --noflush`` text out (pure, no I/O).

Rules are built as an ordered list of :class:`Rule` (table, chain, arguments), the way
Istio's builder does, and rendered per table in sorted table order: first ``-N`` for every
non-built-in chain that holds a rule (in order of first use), then for chains only jumped
to, then every ``-A`` line in insertion order, then ``COMMIT``. That ordering is what makes
the output equal Istio 1.24's golden files, and newest Istio's (virtual interfaces, per-pod
DNS capture), byte for byte (tests load the goldens and compare).

Two rule sets exist: the in-pod one (:func:`inpod_rules`, SPEC §6) and the host-side probe
SNAT rule (:func:`host_probe_rules`, applied in the node namespace by the agent). Each rule
also knows the canonical form ``iptables-save`` prints for it (:meth:`Rule.save_line`), so
``check`` can compare what the kernel holds with what we would install.
"""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass

from cni_plugin import constants as c
from cni_plugin.redirection.settings import RedirectSettings, checked_virtual_interfaces

BUILTIN_CHAINS = frozenset({"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"})
# Chains this project owns inside a pod namespace, in every table; removal deletes them
# wherever they appear. In the node namespace only the host probe chain is ours.
OWN_CHAINS = (c.CHAIN_PREROUTING, c.CHAIN_OUTPUT)
HOST_CHAINS = (c.CHAIN_POSTROUTING,)
INPOD_TABLES = ("mangle", "nat", "raw")


class Family(enum.Enum):
    """An address family and the xtables command family that manages it."""

    IPV4 = "ipv4"
    IPV6 = "ipv6"

    @property
    def command(self) -> str:
        return "iptables" if self is Family.IPV4 else "ip6tables"

    @property
    def host_prefix(self) -> int:
        return 32 if self is Family.IPV4 else 128

    @property
    def loopback(self) -> str:
        return "127.0.0.1/32" if self is Family.IPV4 else "::1/128"


@dataclass(frozen=True)
class Rule:
    """One appended rule: ``-A <chain> <args...>`` in ``table``."""

    table: str
    chain: str
    args: tuple[str, ...]

    @property
    def jump(self) -> str | None:
        """The ``-j`` target when it is the rule's last word (a plain jump), else None."""
        if len(self.args) >= 2 and self.args[-2] == "-j":
            return self.args[-1]
        return None

    def restore_line(self) -> str:
        return " ".join(("-A", self.chain, *self.args))

    def save_line(self, family: Family) -> str:
        """The line ``iptables-save`` prints for this rule once installed.

        The kernel round trip puts the address/interface/protocol part first (in the order
        ``-s -d -i -o -p``), adds the host prefix to bare addresses, makes an implicit
        protocol match explicit where its first port option stands (``-p tcp --dport`` is
        printed ``-p tcp -m tcp --dport``) and spells ``--to-port`` as ``--to-ports``. A netns
        test checks this against real output for every variant, with both xtables backends.
        """
        header: dict[str, list[str]] = {}
        rest: list[str] = []
        args = list(self.args)
        i = 0
        while i < len(args):
            negated = args[i] == "!" and i + 1 < len(args) and args[i + 1] in _HEADER_FLAGS
            flag = args[i + 1] if negated else args[i]
            if flag in _HEADER_FLAGS and (negated or args[i] != "!"):
                value = args[i + 2] if negated else args[i + 1]
                if flag in ("-s", "-d") and "/" not in value:
                    value = f"{value}/{family.host_prefix}"
                header[flag] = (["!"] if negated else []) + [flag, value]
                i += 3 if negated else 2
                continue
            rest.append("--to-ports" if args[i] == "--to-port" else args[i])
            i += 1
        proto = header.get("-p", [""])[-1]
        explicit = any(a == "-m" and b == proto for a, b in itertools.pairwise(rest))
        if proto in ("tcp", "udp") and not explicit:
            for j, word in enumerate(rest):
                if word in ("--dport", "--sport"):
                    at = j - 1 if j and rest[j - 1] == "!" else j
                    rest[at:at] = ["-m", proto]
                    break
        words = [w for flag in _HEADER_FLAGS if flag in header for w in header[flag]]
        return " ".join(("-A", self.chain, *words, *rest))


_HEADER_FLAGS = ("-s", "-d", "-i", "-o", "-p")


@dataclass(frozen=True)
class RuleSet:
    """The ordered rules of one address family."""

    family: Family
    rules: tuple[Rule, ...]

    def tables(self) -> list[str]:
        return sorted({r.table for r in self.rules})

    def rules_of(self, table: str) -> list[Rule]:
        return [r for r in self.rules if r.table == table]

    def chains(self, table: str) -> list[str]:
        """Non-built-in chains of ``table`` in ``-N`` order: first those holding rules, in
        order of first rule, then those only jumped to."""
        seen: list[str] = []
        rules = self.rules_of(table)
        for name in [r.chain for r in rules] + [r.jump or "" for r in rules]:
            if name and name not in BUILTIN_CHAINS and name not in seen and _is_chain(name):
                seen.append(name)
        return seen

    def table_text(self, table: str) -> str:
        lines = [f"* {table}"]
        lines += [f"-N {chain}" for chain in self.chains(table)]
        lines += [r.restore_line() for r in self.rules_of(table)]
        lines.append("COMMIT")
        return "\n".join(lines)

    def restore_text(self) -> str:
        """``iptables-restore --noflush`` input, without a trailing newline (as the goldens)."""
        return "\n".join(self.table_text(t) for t in self.tables())


def _is_chain(target: str) -> bool:
    # Targets in upper case that are not extensions are chains; ours all start with ISTIO_.
    return target.startswith("ISTIO_") or target in BUILTIN_CHAINS


def _mark(value: int, mask: int) -> str:
    return f"0x{value:x}/0x{mask:x}"


def inpod_rules(settings: RedirectSettings, family: Family) -> RuleSet:
    """The in-pod rules (SPEC §6) for one family, in Istio 1.24's order (with newer
    Istio's virtual-interface rules when the settings name any)."""
    s = settings
    pre, out = c.CHAIN_PREROUTING, c.CHAIN_OUTPUT
    ztunnel_mark = _mark(s.ztunnel_mark, s.mark_mask)
    connmark = _mark(s.connmark, s.mark_mask)
    probe = s.probe_snat_ipv4 if family is Family.IPV4 else s.probe_snat_ipv6
    lo = family.loopback
    not_ztunnel = ("-m", "mark", "!", "--mark", ztunnel_mark)
    rules: list[Rule] = []

    def add(table: str, chain: str, *args: str) -> None:
        rules.append(Rule(table, chain, args))

    # Jumps from the built-in chains into ours: removal only has to undo these and our chains.
    add("mangle", "PREROUTING", "-j", pre)
    add("mangle", "OUTPUT", "-j", out)
    add("nat", "OUTPUT", "-j", out)
    if s.dns_capture:
        add("raw", "PREROUTING", "-j", pre)
        add("raw", "OUTPUT", "-j", out)
    add("nat", "PREROUTING", "-j", pre)

    # Virtual interfaces (Istio 1.25+, KubeVirt and the like) short-circuit first: what
    # arrives on them comes from a VM inside the pod, so it is outbound traffic for
    # ztunnel. TCP only (UDP cannot be proxied); RETURN skips the inbound rules below.
    for iface in checked_virtual_interfaces(s):
        add("nat", pre, "-i", iface, "-p", "tcp", "-j", "REDIRECT", "--to-ports",
            str(s.outbound_port))  # fmt: skip
        add("nat", pre, "-i", iface, "-p", "tcp", "-j", "RETURN")

    if not s.bypass_inbound or s.ingress_connmark:
        # ztunnel's marked packets set a connmark, so replies to its spoofed-source inbound
        # connections can be steered back to it (mark restore + policy route to table 100).
        add("mangle", pre, "-m", "mark", "--mark", ztunnel_mark, "-j", "CONNMARK",
            "--set-xmark", connmark)  # fmt: skip
    if not s.bypass_inbound:
        # Kubelet probes arrive SNATed from the probe address: never capture them.
        add("nat", pre, "-s", probe, "-p", "tcp", "-m", "tcp", "-j", "ACCEPT")
    # ...nor the pod's answers to them.
    add("nat", out, "-d", probe, "-p", "tcp", "-m", "tcp", "-j", "ACCEPT")
    if not s.bypass_inbound:
        # Inbound: everything not for loopback, not HBONE, not ztunnel's own -> plaintext port.
        add("nat", pre, "!", "-d", lo, "-p", "tcp", "!", "--dport", str(s.hbone_port),
            *not_ztunnel, "-j", "REDIRECT", "--to-ports", str(s.inbound_port))  # fmt: skip
    add("mangle", out, "-m", "connmark", "--mark", connmark, "-j", "CONNMARK",
        "--restore-mark", "--nfmask", "0xffffffff", "--ctmask", "0xffffffff")  # fmt: skip
    if s.dns_capture:
        dns = str(c.DNS_PORT)
        add("nat", out, "!", "-o", "lo", "-p", "udp", *not_ztunnel, "-m", "udp",
            "--dport", dns, "-j", "REDIRECT", "--to-port", str(s.dns_port))  # fmt: skip
        add("nat", out, "!", "-d", lo, "-p", "tcp", "--dport", dns, *not_ztunnel,
            "-j", "REDIRECT", "--to-ports", str(s.dns_port))  # fmt: skip
        # ztunnel's upstream DNS and its answers get their own conntrack zone, so they never
        # collide with the app's redirected flows on the same ports.
        zone = str(s.dns_ct_zone)
        add("raw", out, "-p", "udp", "-m", "mark", "--mark", ztunnel_mark, "-m", "udp",
            "--dport", dns, "-j", "CT", "--zone", zone)  # fmt: skip
        add("raw", pre, "-p", "udp", *not_ztunnel, "-m", "udp", "--sport", dns,
            "-j", "CT", "--zone", zone)  # fmt: skip
    add("nat", out, "-p", "tcp", "-m", "mark", "--mark", connmark, "-j", "ACCEPT")
    # The app calling itself through its own pod address (via lo) is not captured.
    add("nat", out, "!", "-d", lo, "-o", "lo", "-j", "ACCEPT")
    add("nat", out, "!", "-d", lo, "-p", "tcp", *not_ztunnel,
        "-j", "REDIRECT", "--to-ports", str(s.outbound_port))  # fmt: skip
    return RuleSet(family, tuple(rules))


def families(settings: RedirectSettings) -> list[Family]:
    return [Family.IPV4, Family.IPV6] if settings.ipv6 else [Family.IPV4]


def render_inpod(settings: RedirectSettings) -> str:
    """The IPv4 restore text, then (when IPv6 is on) the IPv6 one, joined by a newline:
    exactly the shape of Istio's ``*_ipv6.golden`` files."""
    return "\n".join(inpod_rules(settings, f).restore_text() for f in families(settings))


def host_probe_rules(settings: RedirectSettings, family: Family) -> RuleSet:
    """The node-namespace rule that SNATs node-local (kubelet) TCP to enrolled pods, whose
    addresses the agent keeps in the probe ipset, to the probe address."""
    if family is Family.IPV4:
        ipset, snat = c.PROBE_IPSET_V4, settings.probe_snat_ipv4
    else:
        ipset, snat = c.PROBE_IPSET_V6, settings.probe_snat_ipv6
    post = c.CHAIN_POSTROUTING
    rules = (
        Rule("nat", "POSTROUTING", ("-j", post)),
        Rule("nat", post, ("-m", "owner", "--socket-exists", "-p", "tcp", "-m", "set",
                           "--match-set", ipset, "dst", "-j", "SNAT", "--to-source", snat)),
    )  # fmt: skip
    return RuleSet(family, rules)


def render_host_probe(settings: RedirectSettings) -> str:
    """Host probe rule text for IPv4 then (when IPv6 is on) IPv6, as ``hostprobe*.golden``."""
    return "\n".join(host_probe_rules(settings, f).restore_text() for f in families(settings))
