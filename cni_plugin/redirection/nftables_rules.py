"""Pure model of Istio's ambient nftables redirection: settings in, ``nft -f`` text out.

Role: decide *which* tables, chains and rules the nftables backend installs, in Istio's
order, and render them as the exact text of Istio's ``cni/pkg/nftables`` goldens
(``reference/istio-1.28/nftables/*.golden``). No I/O: the backend feeds :meth:`Ruleset.text`
to libnftables and uses :func:`listing_form` to compare what the kernel lists back.

Invariants:
- In-pod rules live in three ``inet`` tables (``istio-ambient-{nat,mangle,raw}``); each
  present table is rendered as ``add table`` + ``flush table`` + chains + rules, so feeding
  the text twice leaves the same state as once (nftables applies a buffer atomically).
- The raw table exists only when DNS capture is on; IPv6 rules only when ``ipv6`` is set.
- Rule text keeps Istio's spelling byte for byte (including its doubled spaces), because the
  goldens are compared byte for byte; :func:`listing_form` maps that spelling to the
  canonical form ``nft --stateless --numeric-priority list`` prints.
- Supported variants: default, ingress (``bypass_inbound``), DNS capture on/off (which is
  all the 1.25+ per-pod ``dns_pod_*`` override resolves to), the 1.25+
  ``istio.io/reroute-virtual-interfaces`` list, and the host-side probe SNAT rule.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from cni_plugin import constants as c
from cni_plugin.redirection.settings import RedirectSettings, checked_virtual_interfaces

FAMILY = "inet"
NAT_TABLE = "istio-ambient-nat"
MANGLE_TABLE = "istio-ambient-mangle"
RAW_TABLE = "istio-ambient-raw"
# Every table an in-pod ruleset may contain: remove and check consider all of them ours.
INPOD_TABLES: tuple[str, ...] = (NAT_TABLE, MANGLE_TABLE, RAW_TABLE)

PREROUTING = "prerouting"
OUTPUT = "output"
POSTROUTING = "postrouting"
ISTIO_PREROUTING = "istio-prerouting"
ISTIO_OUTPUT = "istio-output"

# Standard hook priorities (nft's dstnat/srcnat/mangle/raw), as Istio's knftables uses them.
PRIO_RAW = -300
PRIO_MANGLE = -150
PRIO_DSTNAT = -100
PRIO_SRCNAT = 100

# Comment Istio puts on the host probe sets.
PROBE_SET_COMMENT = "UUID of the pods that are part of ambient mesh"


@dataclass(frozen=True)
class BaseChain:
    """A chain attached to a netfilter hook."""

    name: str
    type: str
    hook: str
    priority: int

    def header(self) -> str:
        """The chain's canonical listing line (numeric priority, default policy)."""
        return f"type {self.type} hook {self.hook} priority {self.priority}; policy accept;"


@dataclass(frozen=True)
class Rule:
    """One rule: the chain it is appended to and its statement text in Istio's spelling."""

    chain: str
    expr: str


@dataclass(frozen=True)
class Table:
    """One ``inet`` table: hooked chains, regular chains and rules in append order."""

    name: str
    base_chains: tuple[BaseChain, ...]
    chains: tuple[str, ...]
    rules: tuple[Rule, ...]

    @property
    def chain_names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.base_chains) + self.chains

    def text(self) -> str:
        t = f"{FAMILY} {self.name}"
        lines = [f"add table {t}", f"flush table {t}"]
        for b in self.base_chains:
            lines.append(
                f"add chain {t} {b.name} {{ type {b.type} hook {b.hook} priority {b.priority} ; }}"
            )
        lines.extend(f"add chain {t} {name}" for name in self.chains)
        lines.extend(f"add rule {t} {r.chain} {r.expr}" for r in self.rules)
        return "\n".join(lines) + "\n"

    def expected_chains(self) -> dict[str, tuple[str | None, tuple[str, ...]]]:
        """chain -> (canonical header or None for regular chains, canonical rule lines)."""
        out: dict[str, tuple[str | None, tuple[str, ...]]] = {}
        for b in self.base_chains:
            out[b.name] = (b.header(), ())
        for name in self.chains:
            out[name] = (None, ())
        for r in self.rules:
            header, rules = out[r.chain]
            out[r.chain] = (header, (*rules, listing_form(r.expr)))
        return out


@dataclass(frozen=True)
class Ruleset:
    """An ordered set of tables, rendered as one ``nft -f`` buffer (one transaction)."""

    tables: tuple[Table, ...]

    @property
    def table_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tables)

    def text(self) -> str:
        return "".join(t.text() for t in self.tables)


class _TableBuilder:
    """Collects rules in append order; only chains that are used end up in the table."""

    def __init__(self, name: str, base_chains: Sequence[BaseChain]) -> None:
        self.name = name
        self.base_chains = tuple(base_chains)
        self.rules: list[Rule] = []

    def add(self, chain: str, expr: str) -> None:
        self.rules.append(Rule(chain, expr))

    def build(self) -> Table | None:
        if not self.rules:
            return None
        used = {r.chain for r in self.rules}
        used |= {r.expr.split()[-1] for r in self.rules if r.expr.startswith("jump ")}
        return Table(
            name=self.name,
            base_chains=tuple(b for b in self.base_chains if b.name in used),
            chains=tuple(n for n in (ISTIO_PREROUTING, ISTIO_OUTPUT) if n in used),
            rules=tuple(self.rules),
        )


def _hex(value: int) -> str:
    return f"0x{value:x}"


def inpod_ruleset(settings: RedirectSettings) -> Ruleset:
    """The in-pod ruleset for ``settings``.

    ``settings.virtual_interfaces`` (Istio 1.25+ ``istio.io/reroute-virtual-interfaces``):
    inbound TCP arriving on these interfaces is treated as outbound and sent to ztunnel's
    outbound port (invalid names raise :class:`~cni_plugin.errors.RedirectionError`).
    """
    s = settings
    mask = _hex(s.mark_mask)
    zmark = _hex(s.ztunnel_mark)
    cmark = _hex(s.connmark)
    keep = _hex(~s.mark_mask & 0xFFFFFFFF)
    v6 = s.ipv6

    nat = _TableBuilder(
        NAT_TABLE,
        [
            BaseChain(PREROUTING, "nat", PREROUTING, PRIO_DSTNAT),
            BaseChain(OUTPUT, "nat", OUTPUT, PRIO_DSTNAT),
        ],
    )
    mangle = _TableBuilder(
        MANGLE_TABLE,
        [
            BaseChain(PREROUTING, "filter", PREROUTING, PRIO_MANGLE),
            # "route" so that a changed mark on locally generated packets re-routes them.
            BaseChain(OUTPUT, "route", OUTPUT, PRIO_MANGLE),
        ],
    )
    raw = _TableBuilder(
        RAW_TABLE,
        [
            BaseChain(PREROUTING, "filter", PREROUTING, PRIO_RAW),
            BaseChain(OUTPUT, "filter", OUTPUT, PRIO_RAW),
        ],
    )

    # Jumps, in Istio's order (it matters for byte equality: nat's output jump comes first).
    mangle.add(PREROUTING, f"jump {ISTIO_PREROUTING}")
    mangle.add(OUTPUT, f"jump {ISTIO_OUTPUT}")
    nat.add(OUTPUT, f"jump {ISTIO_OUTPUT}")
    if s.dns_capture:
        raw.add(PREROUTING, f"jump {ISTIO_PREROUTING}")
        raw.add(OUTPUT, f"jump {ISTIO_OUTPUT}")
    nat.add(PREROUTING, f"jump {ISTIO_PREROUTING}")

    # Virtual interfaces first: short-circuits before any other inbound handling.
    for iface in checked_virtual_interfaces(s):
        nat.add(
            ISTIO_PREROUTING,
            f"iifname {iface} meta l4proto tcp counter redirect to :{s.outbound_port}",
        )
        nat.add(ISTIO_PREROUTING, f"iifname {iface} meta l4proto tcp counter return")

    # ztunnel marked the packet: remember it on the connection so replies route via table 100.
    mangle.add(
        ISTIO_PREROUTING,
        f"meta mark & {mask} == {zmark} counter ct mark set ct mark & {keep} |  {cmark}",
    )

    # Kubelet probes arrive SNATed from the probe address: never captured.
    if not s.bypass_inbound:
        nat.add(
            ISTIO_PREROUTING,
            f"meta l4proto tcp ip saddr {s.probe_snat_ipv4} counter accept",
        )
        if v6:
            nat.add(
                ISTIO_PREROUTING,
                f"meta l4proto tcp ip6 saddr {s.probe_snat_ipv6} counter accept",
            )
    nat.add(ISTIO_OUTPUT, f"meta l4proto tcp ip daddr {s.probe_snat_ipv4} counter accept")
    if v6:
        nat.add(ISTIO_OUTPUT, f"meta l4proto tcp ip6 daddr {s.probe_snat_ipv6} counter accept")

    # Inbound: everything but loopback, HBONE and ztunnel's own traffic -> inbound plaintext.
    if not s.bypass_inbound:
        # Istio's v4 rule spells its mark match with a doubled space; kept for byte equality.
        nat.add(
            ISTIO_PREROUTING,
            f"ip daddr != 127.0.0.1/32 tcp dport != {s.hbone_port} mark and {mask}  != {zmark}"
            f" counter redirect to :{s.inbound_port}",
        )
        if v6:
            nat.add(
                ISTIO_PREROUTING,
                f"ip6 daddr != ::1/128 tcp dport != {s.hbone_port} mark and {mask} != {zmark}"
                f" counter redirect to :{s.inbound_port}",
            )

    # Restore the connection's mark on replies so the policy route applies to them.
    mangle.add(ISTIO_OUTPUT, f"ct mark and {mask} == {cmark} counter meta mark set ct mark")

    if s.dns_capture:
        dns = c.DNS_PORT
        nat.add(
            ISTIO_OUTPUT,
            f"oifname != lo mark and {mask} != {zmark} udp dport {dns}"
            f" counter redirect to :{s.dns_port}",
        )
        nat.add(
            ISTIO_OUTPUT,
            f"ip daddr != 127.0.0.1/32 tcp dport {dns} mark and {mask} != {zmark}"
            f" counter redirect to :{s.dns_port}",
        )
        if v6:
            nat.add(
                ISTIO_OUTPUT,
                f"ip6 daddr != ::1/128 tcp dport {dns} mark and {mask} != {zmark}"
                f" counter redirect to :{s.dns_port}",
            )
        # ztunnel's upstream DNS and its replies get their own conntrack zone, so they
        # cannot collide with the app's captured DNS flows on the same ports.
        zone = s.dns_ct_zone
        raw.add(
            ISTIO_OUTPUT,
            f"udp dport {dns} meta mark and {mask} == {zmark} counter ct zone set {zone}",
        )
        raw.add(
            ISTIO_PREROUTING,
            f"udp sport {dns} meta mark and {mask} != {zmark} counter ct zone set {zone}",
        )

    # Outbound.
    nat.add(ISTIO_OUTPUT, f"meta l4proto tcp mark and {mask} == {cmark} counter accept")
    nat.add(ISTIO_OUTPUT, "oifname lo ip daddr != 127.0.0.1/32 counter accept")
    if v6:
        nat.add(ISTIO_OUTPUT, "oifname lo ip6 daddr != ::1/128 counter accept")
    nat.add(
        ISTIO_OUTPUT,
        f"meta l4proto tcp ip daddr != 127.0.0.1/32 mark and {mask} != {zmark}"
        f" counter redirect to :{s.outbound_port}",
    )
    if v6:
        nat.add(
            ISTIO_OUTPUT,
            f"meta l4proto tcp ip6 daddr != ::1/128 mark and {mask} != {zmark}"
            f" counter redirect to :{s.outbound_port}",
        )

    tables = (nat.build(), mangle.build(), raw.build())
    return Ruleset(tuple(t for t in tables if t is not None))


def host_probe_ruleset(settings: RedirectSettings, kubelet_uid: int) -> Ruleset:
    """Host-side (node namespace) rule: SNAT kubelet's TCP to enrolled pods from the probe
    address. nftables has no ``--socket-exists``; like Istio, kubelet is matched by UID.
    The rule refers to the probe sets (:func:`host_probe_sets_text`), which must exist."""
    if kubelet_uid < 0:
        raise ValueError(f"kubelet uid must be >= 0, got {kubelet_uid}")
    nat = _TableBuilder(NAT_TABLE, [BaseChain(POSTROUTING, "nat", POSTROUTING, PRIO_SRCNAT)])
    nat.add(
        POSTROUTING,
        f"meta l4proto tcp skuid {kubelet_uid} ip daddr @{c.PROBE_IPSET_V4}"
        f" counter snat to {settings.probe_snat_ipv4}",
    )
    if settings.ipv6:
        nat.add(
            POSTROUTING,
            f"meta l4proto tcp skuid {kubelet_uid} ip6 daddr @{c.PROBE_IPSET_V6}"
            f" counter snat to {settings.probe_snat_ipv6}",
        )
    table = nat.build()
    assert table is not None  # it always has a rule
    return Ruleset((table,))


def host_probe_sets_text(ipv6: bool) -> str:
    """``nft -f`` text creating the host probe sets (idempotent: ``add`` keeps elements).
    Separate from :func:`host_probe_ruleset`: flushing the rules must keep the members."""
    t = f"{FAMILY} {NAT_TABLE}"
    lines = [
        f"add table {t}",
        f'add set {t} {c.PROBE_IPSET_V4} {{ type ipv4_addr ; comment "{PROBE_SET_COMMENT}" ; }}',
    ]
    if ipv6:
        lines.append(
            f'add set {t} {c.PROBE_IPSET_V6} {{ type ipv6_addr ; comment "{PROBE_SET_COMMENT}" ; }}'
        )
    return "\n".join(lines) + "\n"


# --- canonical listing form -------------------------------------------------------------


def listing_form(expr: str) -> str:
    """How ``nft --stateless list`` prints a rule given in Istio's spelling.

    nft normalises on the way back: ``mark`` becomes ``meta mark``, ``and`` becomes ``&``,
    marks print as 8-digit hex, interface names are quoted, host prefixes (/32, /128) are
    dropped, ``skuid`` gains ``meta``, ``snat to`` names its family, and
    ``ct mark & A | B`` is folded to ``ct mark & (A|B) | B``.
    """
    toks = expr.split()
    out: list[str] = []
    i = 0
    while i < len(toks):
        tok = toks[i]
        prev = out[-1] if out else ""
        if tok in ("mark", "skuid") and prev not in ("meta", "ct"):
            out += ["meta", tok]
        elif tok == "and":
            out.append("&")
        elif tok in ("==", "!="):
            out.append(tok)
        elif tok.startswith("0x"):
            out.append(f"0x{int(tok, 16):08x}")
        elif prev in ("iifname", "oifname") or (
            prev == "!=" and len(out) > 1 and out[-2] in ("iifname", "oifname")
        ):
            out.append(f'"{tok}"')
        elif tok == "snat" and i + 2 < len(toks) and toks[i + 1] == "to":
            addr = ipaddress.ip_address(toks[i + 2])
            out += ["snat", "ip" if addr.version == 4 else "ip6", "to", str(addr)]
            i += 3
            continue
        else:
            out.append(_address_form(tok))
        i += 1
    _fold_ct_mark_set(out)
    return " ".join(out)


def _address_form(tok: str) -> str:
    if not any(ch in tok for ch in ".:") or tok.startswith("@") or tok[1:].isdigit():
        return tok  # not an address: a set reference or a ":port"
    try:
        iface = ipaddress.ip_interface(tok)
    except ValueError:
        return tok
    if iface.network.prefixlen == iface.max_prefixlen:
        return str(iface.ip)
    return str(iface.network)


def _fold_ct_mark_set(out: list[str]) -> None:
    # "ct mark set ct mark & A | B": nft stores (mark & A) | B as (mark & (A | B)) ^ B and
    # prints the mask back as A | B.
    for i in range(len(out) - 8):
        if out[i : i + 6] == ["ct", "mark", "set", "ct", "mark", "&"] and out[i + 7] == "|":
            folded = int(out[i + 6], 16) | int(out[i + 8], 16)
            out[i + 6] = f"0x{folded:08x}"
