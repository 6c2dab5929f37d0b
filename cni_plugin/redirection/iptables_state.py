"""What a namespace's xtables hold, read from ``iptables-save`` text (pure, no I/O).

Used by both appliers and by ``check``: parse the save output, compare it with a
:class:`~cni_plugin.redirection.iptables_rules.RuleSet`, and derive the exact deletions that
remove everything of ours (our chains, and every jump into them from a built-in chain) while
leaving every other rule untouched. The same works for the host probe rule in the node
namespace: parse with ``own=HOST_CHAINS``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from cni_plugin.redirection.iptables_rules import BUILTIN_CHAINS, OWN_CHAINS, RuleSet


@dataclass
class SavedTables:
    """Parsed ``iptables-save``: per table, the declared chains and each chain's rule lines
    (``-A CHAIN ...`` exactly as printed). ``own`` names the chains that are ours: the
    in-pod chains by default, :data:`HOST_CHAINS` when reading the node namespace."""

    chains: dict[str, list[str]] = field(default_factory=dict)
    rules: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    own: tuple[str, ...] = OWN_CHAINS

    def own_chains(self, table: str) -> list[str]:
        return [ch for ch in self.chains.get(table, []) if ch in self.own]

    def jumps_to_own(self, table: str) -> list[str]:
        """Rule lines in built-in chains whose target is one of our chains."""
        out = []
        for chain, lines in self.rules.get(table, {}).items():
            if chain in BUILTIN_CHAINS:
                out += [ln for ln in lines if _target(ln) in self.own]
        return out

    def holds_ours(self) -> bool:
        return any(self.own_chains(t) or self.jumps_to_own(t) for t in self.chains)


def _target(line: str) -> str | None:
    words = line.split()
    for i, w in enumerate(words[:-1]):
        if w in ("-j", "--jump", "-g", "--goto"):
            return words[i + 1]
    return None


def parse_save(text: str, own: tuple[str, ...] = OWN_CHAINS) -> SavedTables:
    saved = SavedTables(own=own)
    table = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or line == "COMMIT":
            continue
        if line.startswith("*"):
            table = line[1:].strip()
            saved.chains.setdefault(table, [])
            saved.rules.setdefault(table, {})
        elif line.startswith(":"):
            saved.chains[table].append(line[1:].split()[0])
        elif line.startswith("-A "):
            chain = line.split()[1]
            saved.rules[table].setdefault(chain, []).append(line)
    return saved


def diff(expected: RuleSet, saved: SavedTables) -> tuple[list[str], list[str]]:
    """(missing, extra): our rules/chains that ``apply`` would install but are absent, and
    ours that are present but would not be installed. Each item names family and table."""
    fam = expected.family.value
    missing: list[str] = []
    extra: list[str] = []
    for table in sorted(set(expected.tables()) | set(saved.chains)):
        want_chains = expected.chains(table)
        have_chains = saved.own_chains(table)
        missing += [f"{fam} {table}: chain {ch}" for ch in want_chains if ch not in have_chains]
        extra += [f"{fam} {table}: chain {ch}" for ch in have_chains if ch not in want_chains]
        by_chain: dict[str, list[str]] = {}
        for rule in expected.rules_of(table):
            by_chain.setdefault(rule.chain, []).append(rule.save_line(expected.family))
        observed: dict[str, list[str]] = {ch: [] for ch in by_chain}
        for line in saved.jumps_to_own(table):
            observed.setdefault(line.split()[1], []).append(line)
        for ch in have_chains:
            observed[ch] = list(saved.rules.get(table, {}).get(ch, []))
        for ch in sorted(set(by_chain) | set(observed)):
            want, have = by_chain.get(ch, []), observed.get(ch, [])
            lack, surplus = Counter(want) - Counter(have), Counter(have) - Counter(want)
            missing += [f"{fam} {table}: {ln}" for ln in want if lack[ln] and _take(lack, ln)]
            extra += [f"{fam} {table}: {ln}" for ln in have if surplus[ln] and _take(surplus, ln)]
            if not lack and not surplus and want != have and ch not in BUILTIN_CHAINS:
                extra.append(f"{fam} {table}: rules of {ch} are out of order")
    return missing, extra


def _take(counter: Counter[str], key: str) -> bool:
    counter[key] -= 1
    return True


def removal_script(saved: SavedTables) -> str:
    """``iptables-restore --noflush`` input deleting every jump into our chains, then our
    chains (flushed first). Empty when nothing of ours is present."""
    blocks = []
    for table in sorted(saved.chains):
        jumps, chains = saved.jumps_to_own(table), saved.own_chains(table)
        if not jumps and not chains:
            continue
        lines = [f"* {table}"]
        lines += ["-D " + ln[len("-A ") :] for ln in jumps]
        lines += [f"-F {ch}" for ch in chains]
        lines += [f"-X {ch}" for ch in chains]
        lines.append("COMMIT")
        blocks.append("\n".join(lines))
    return "\n".join(blocks) + "\n" if blocks else ""
