"""nftables redirection backend: Istio's ambient nft tables, applied through libnftables.

Role: install, remove and verify in-pod redirection inside one pod network namespace using
the ruleset of :mod:`cni_plugin.redirection.nftables_rules` plus the shared policy routes
(fwmark 0x111/0xfff -> table 100, ``local`` default route on ``lo`` in table 100).

Invariants:
- The libnftables context is created on the namespace thread *after* entering the pod
  namespace, so its netlink socket lives there; the caller's thread never moves.
- Rules go in as one nft buffer, which the kernel commits atomically: either every table
  is replaced or nothing changes. Tables of ours that the settings no longer want (the raw
  table after DNS capture is turned off) are deleted in the same transaction.
- ``apply`` installs the rules, then the routes; if the routes fail, our tables are put
  back as they were before the call (the routes module undoes its own partial work).
- ``remove`` deletes the three ``istio-ambient-*`` tables (wholly ours) and the routes;
  absent objects are not an error. ``check`` only lists.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Protocol

import nftables

from cni_plugin.errors import RedirectionError
from cni_plugin.netns import run_in_netns
from cni_plugin.redirection import policy_routes
from cni_plugin.redirection.backend import CheckReport
from cni_plugin.redirection.nftables_rules import FAMILY, INPOD_TABLES, Ruleset, inpod_ruleset
from cni_plugin.redirection.settings import RedirectSettings


class PolicyRoutes(Protocol):
    """The shared policy-routing edge (:mod:`cni_plugin.redirection.policy_routes` is the
    real one); every call runs inside the pod namespace."""

    def describe_all(self, settings: RedirectSettings) -> list[str]: ...

    def install(self, settings: RedirectSettings) -> object: ...

    def uninstall(self, settings: RedirectSettings) -> None: ...

    def check(self, settings: RedirectSettings) -> tuple[list[str], list[str]]: ...


class NftContext(Protocol):
    """The slice of ``nftables.Nftables`` this backend uses (one real implementation)."""

    def cmd(self, cmdline: str) -> tuple[int, str, str]: ...

    def set_json_output(self, on: bool) -> object: ...


def libnftables_context() -> NftContext:
    try:
        nft = nftables.Nftables()
    except OSError as e:
        raise RedirectionError(
            f"libnftables cannot be loaded ({e}): install the nftables packages (make setup)"
        ) from None
    # Listing in the canonical form nftables_rules.listing_form predicts.
    nft.set_stateless_output(True)
    nft.set_numeric_prio_output(True)
    nft.set_json_output(False)
    ctx: NftContext = nft
    return ctx


class NftablesBackend:
    """In-pod redirection with nftables (``inet istio-ambient-{nat,mangle,raw}`` tables)."""

    name = "nftables"

    def __init__(
        self,
        *,
        nft_factory: Callable[[], NftContext] = libnftables_context,
        routes: PolicyRoutes | None = None,
    ) -> None:
        self._nft_factory = nft_factory
        self._routes: PolicyRoutes = routes if routes is not None else policy_routes

    def ruleset(self, settings: RedirectSettings) -> Ruleset:
        return inpod_ruleset(settings)

    def render(self, settings: RedirectSettings) -> str:
        """The ``nft -f`` text (Istio's golden format) then the routes as ``#`` comments,
        so the whole text stays valid ``nft -f`` input."""
        routes = "".join(f"# {line}\n" for line in self._routes.describe_all(settings))
        return self.ruleset(settings).text() + routes

    def apply(self, netns_path: str, settings: RedirectSettings) -> None:
        ruleset = self.ruleset(settings)
        script = _stale_tables_script(ruleset) + ruleset.text()

        def work() -> None:
            nft = self._nft_factory()
            # What to put back if the routes fail after the rules went in: our tables as
            # they were (a listing is valid nft input), or nothing.
            restore = _delete_tables_script() + "".join(
                _run(nft, f"list table {FAMILY} {t}", netns_path) for t in _our_tables(nft)
            )
            rc, _, err = nft.cmd(script)
            if rc != 0:
                raise RedirectionError(
                    f"installing nftables rules in {netns_path} failed: {first_line(err)}; "
                    "nothing was changed. Check that the kernel has nf_tables and that "
                    "nothing else owns the istio-ambient-* tables there"
                )
            try:
                self._routes.install(settings)  # undoes its own partial work on failure
            except BaseException as e:
                rc, _, err = nft.cmd(restore)
                if rc != 0:
                    raise RedirectionError(
                        f"{e}; putting the previous nftables tables back in {netns_path} also "
                        f"failed: {first_line(err)}; run remove, then apply again"
                    ) from e
                raise

        run_in_netns(netns_path, work)

    def remove(self, netns_path: str, settings: RedirectSettings) -> None:
        script = _delete_tables_script()

        def work() -> None:
            nft = self._nft_factory()
            rc, _, err = nft.cmd(script)
            self._routes.uninstall(settings)
            if rc != 0:
                raise RedirectionError(
                    f"removing nftables rules from {netns_path} failed: {first_line(err)}; "
                    "the routes were removed, the tables were left: retry the removal"
                )

        run_in_netns(netns_path, work)

    def check(self, netns_path: str, settings: RedirectSettings) -> CheckReport:
        ruleset = self.ruleset(settings)

        def work() -> CheckReport:
            nft = self._nft_factory()
            missing: list[str] = []
            extra: list[str] = []
            present = _our_tables(nft)
            expected = {t.name: t for t in ruleset.tables}
            for name in INPOD_TABLES:
                label = f"table {FAMILY} {name}"
                if name not in expected:
                    if name in present:
                        extra.append(label)
                    continue
                if name not in present:
                    missing.append(label)
                    continue
                out = _run(nft, f"list table {FAMILY} {name}", netns_path)
                _compare_table(label, expected[name].expected_chains(), out, missing, extra)
            r_missing, r_extra = self._routes.check(settings)
            return CheckReport(missing=(*missing, *r_missing), extra=(*extra, *r_extra))

        return run_in_netns(netns_path, work)


def _delete_tables_script(tables: Sequence[str] = INPOD_TABLES) -> str:
    # "add" first makes "delete" succeed whether or not the table exists, all in one
    # transaction (nft 1.0.6 has no "destroy").
    return "".join(f"add table {FAMILY} {t}\ndelete table {FAMILY} {t}\n" for t in tables)


def _stale_tables_script(ruleset: Ruleset) -> str:
    return _delete_tables_script([t for t in INPOD_TABLES if t not in ruleset.table_names])


def _run(nft: NftContext, command: str, netns_path: str) -> str:
    rc, out, err = nft.cmd(command)
    if rc != 0:
        raise RedirectionError(f"nft {command!r} in {netns_path} failed: {first_line(err)}")
    return out if out.endswith("\n") else out + "\n"


def first_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    return lines[0] if lines else "unknown error"


def _our_tables(nft: NftContext) -> list[str]:
    """Our tables present, in the kernel's listing order (a restore recreates them in that
    order, so the namespace lists exactly as before)."""
    rc, out, err = nft.cmd("list tables")
    if rc != 0:
        raise RedirectionError(f"listing nftables tables failed: {first_line(err)}")
    names: list[str] = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "table" and parts[1] == FAMILY:
            names.append(parts[2])
    return [n for n in names if n in INPOD_TABLES]


ChainListing = dict[str, tuple[str | None, list[str]]]


def parse_table_listing(text: str) -> tuple[ChainListing, list[str]]:
    """Parse ``nft list table`` text: chain -> (header line or None, rule lines), plus the
    labels of any non-chain objects (sets, maps, ...) found in the table."""
    chains: ChainListing = {}
    others: list[str] = []
    current: str | None = None
    skipping = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("table "):
            continue
        if line == "}":
            current, skipping = None, False
            continue
        if skipping:
            continue
        if current is None:
            if line.startswith("chain ") and line.endswith("{"):
                current = line.split()[1]
                chains[current] = (None, [])
            elif line.endswith("{"):
                others.append(line[:-1].strip())
                skipping = True
            continue
        header, rules = chains[current]
        if header is None and not rules and line.startswith("type ") and " hook " in line:
            chains[current] = (line, rules)
        else:
            rules.append(line)
    return chains, others


def _compare_table(
    label: str,
    expected: dict[str, tuple[str | None, tuple[str, ...]]],
    listing: str,
    missing: list[str],
    extra: list[str],
) -> None:
    actual, others = parse_table_listing(listing)
    extra.extend(f"{label}: {o}" for o in others)
    for chain in actual.keys() - expected.keys():
        extra.append(f"{label} chain {chain}")
    for chain, (want_header, want_rules) in expected.items():
        where = f"{label} chain {chain}"
        if chain not in actual:
            missing.append(where)
            continue
        have_header, have_rules = actual[chain]
        if have_header != want_header:
            missing.append(f"{where}: {want_header or 'regular chain'}")
            extra.append(f"{where}: {have_header or 'regular chain'}")
        want, have = Counter(want_rules), Counter(have_rules)
        missing.extend(f"{where}: {r}" for r in (want - have).elements())
        extra.extend(f"{where}: {r}" for r in (have - want).elements())
        if want == have and have_rules != list(want_rules):
            missing.append(f"{where}: rules in the order {list(want_rules)}")
