"""Applier: python-iptables (``iptc``), in process, legacy xtables only.

libiptc works on a snapshot of a whole table taken when its handle is initialised, and
writes the whole table back on commit. So: handles are (re)initialised on the thread that
is inside the pod namespace (iptc caches ``Table`` objects per process; a cached handle
would point at whichever namespace initialised it, and committing it would overwrite that
namespace's table), autocommit is off, each table is committed once (atomic per table), and
handles are closed afterwards (an open handle's socket would keep the namespace alive).
iptc's caches are process-global, hence one lock around every use.

Reading state goes through ``iptables-legacy-save``: merely opening a table with libiptc
would instantiate it in the kernel.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
import threading
from typing import Any

from cni_plugin.errors import RedirectionError
from cni_plugin.redirection.iptables_rules import Family, RuleSet
from cni_plugin.redirection.iptables_state import SavedTables, parse_save

_LOCK = threading.Lock()
_STANDARD = ("ACCEPT", "RETURN", "DROP")
_ADDRESS_FLAGS = {"-s": "src", "-d": "dst", "-p": "protocol", "-i": "in_interface",
                  "-o": "out_interface"}  # fmt: skip


def _iptc() -> Any:
    try:
        import iptc  # type: ignore[import-untyped,unused-ignore]
    except (ImportError, OSError) as e:  # libxtables missing raises OSError at import
        raise RedirectionError(f"python-iptables is unavailable ({e}): run make setup") from None
    return iptc


def _ensure_target(iptc: Any, family: Family, name: str) -> None:
    """Make the target extension ``name`` usable for ``family`` in this process.

    Family-specific extensions such as ``libxt_REDIRECT.so`` register only the entry of
    the family current when the library is first loaded, and a loaded library is never
    initialised again: after IPv4 used REDIRECT, IPv6 cannot find it (and vice versa). A
    private copy of the library, loaded while the other family is current, registers it.
    """
    xt = iptc.xtables
    proto = xt.NFPROTO_IPV4 if family is Family.IPV4 else xt.NFPROTO_IPV6
    if xt.xtables(proto).find_target(name):
        return
    src = os.path.join(xt._xtables_libdir, f"libxt_{name}.so")
    if not os.path.exists(src):
        return  # iptc reports the unknown target itself, with its name
    with tempfile.TemporaryDirectory(prefix="icni-xt-") as tmp:
        copy = os.path.join(tmp, f"libxt_{name}_{family.value}.so")
        shutil.copyfile(src, copy)
        xt.xtables._xtables_set_nfproto(proto)
        ctypes.CDLL(copy)  # its constructor registers the extension for ``proto``
    if not xt.xtables(proto).find_target(name):
        raise RedirectionError(f"python-iptables cannot load target {name} for {family.value}")


def _extension_targets(ruleset: RuleSet) -> list[str]:
    names = {r.args[r.args.index("-j") + 1] for r in ruleset.rules if "-j" in r.args}
    return sorted(n for n in names if not n.startswith("ISTIO_") and n not in _STANDARD)


def _rule_factory(iptc: Any, family: Family, table: Any) -> Any:
    """An ``iptc`` rule class bound to ``table`` alone.

    iptc decides whether a ``-j`` target is a chain by asking every table it knows
    (``Rule.tables``), which opens all five tables in the current namespace (creating empty
    ``filter``/``security`` tables there) and dereferences closed cached handles. Our rules
    only ever jump within the table being edited, so that table is the only one to ask.
    """
    base = iptc.Rule if family is Family.IPV4 else iptc.Rule6

    class TableRule(base):  # type: ignore[misc,valid-type]
        @property
        def tables(self) -> list[Any]:
            return [table]

    return TableRule


def build_rule(factory: Any, args: tuple[str, ...] | list[str]) -> Any:
    """An ``iptc`` rule from iptables command-line words (as in the rule model)."""
    rule = factory()
    current: Any = None
    negate = False
    i = 0
    while i < len(args):
        word = args[i]
        if word == "!":
            negate = True
            i += 1
            continue
        if word in _ADDRESS_FLAGS:
            setattr(rule, _ADDRESS_FLAGS[word], ("!" if negate else "") + args[i + 1])
        elif word == "-m":
            current = rule.create_match(args[i + 1])
        elif word == "-j":
            current = rule.create_target(args[i + 1])
        elif word.startswith("--"):
            values: list[str] = []
            while i + 1 < len(args) and not args[i + 1].startswith("-") and args[i + 1] != "!":
                values.append(args[i + 1])
                i += 1
            if word in ("--dport", "--sport") and getattr(current, "name", "") != rule.protocol:
                # iptables loads the protocol match implicitly for port options.
                current = rule.create_match(rule.protocol)
            name = "to-ports" if word == "--to-port" else word[2:]
            value: Any = values[0] if len(values) == 1 else values
            if negate:
                value = "!" + value if isinstance(value, str) else ["!", *value]
            current.set_parameter(name, value if values else None)
            negate = False
            i += 1
            continue
        else:
            raise RedirectionError(f"python-iptables applier cannot translate {word!r}")
        negate = False
        i += 2
    return rule


class PythonIptablesApplier:
    """Installs a :class:`RuleSet` through libiptc. Methods run inside the target namespace."""

    name = "python-iptables"
    variant = "legacy"

    def describe(self) -> str:
        return "python-iptables (legacy)"

    def _table(self, iptc: Any, family: Family, name: str) -> Any:
        cls = iptc.Table if family is Family.IPV4 else iptc.Table6
        table = cls(name, autocommit=False)
        table.refresh()  # re-initialise the handle in *this* thread's namespace
        return table

    def save(self, family: Family) -> str:
        cmd = f"{family.command}-legacy-save"
        try:
            done = subprocess.run([cmd], capture_output=True, text=True, timeout=30)
        except FileNotFoundError:
            raise RedirectionError(f"{cmd} is not installed: run make setup") from None
        if done.returncode != 0:
            raise RedirectionError(f"{cmd} failed: {done.stderr.strip()}")
        return done.stdout

    def save_all(self, families: list[Family]) -> list[str]:
        return [self.save(f) for f in families]

    def install_all(self, rulesets: list[RuleSet]) -> None:
        """One family after the other (libiptc in process; the backend undoes a partial
        apply when a later family fails)."""
        for rs in rulesets:
            self.install(rs)

    def install(self, ruleset: RuleSet) -> None:
        iptc = _iptc()
        committed: list[str] = []
        with _LOCK:
            try:
                for target in _extension_targets(ruleset):
                    _ensure_target(iptc, ruleset.family, target)
                for name in ruleset.tables():
                    table = self._table(iptc, ruleset.family, name)
                    try:
                        for chain in ruleset.chains(name):
                            table.create_chain(chain)
                        factory = _rule_factory(iptc, ruleset.family, table)
                        for r in ruleset.rules_of(name):
                            rule = build_rule(factory, r.args)
                            iptc.Chain(table, r.chain).append_rule(rule)
                        table.commit()
                        committed.append(name)
                    finally:
                        table.close()  # autocommit is off: closing discards anything pending
            except Exception as e:  # iptc raises IPTCError, XTablesError, ValueError, ...
                if committed:
                    saved = parse_save(self.save(ruleset.family))
                    self._uninstall_locked(iptc, ruleset.family, saved)
                raise RedirectionError(
                    f"python-iptables could not install the {ruleset.family.value} rules ({e}); "
                    "nothing was left behind"
                ) from None

    def uninstall(self, family: Family, saved: SavedTables) -> None:
        iptc = _iptc()
        with _LOCK:
            self._uninstall_locked(iptc, family, saved)

    def _uninstall_locked(self, iptc: Any, family: Family, saved: SavedTables) -> None:
        for name in sorted(saved.chains):
            jumps, chains = saved.jumps_to_own(name), saved.own_chains(name)
            if not jumps and not chains:
                continue
            table = self._table(iptc, family, name)
            try:
                factory = _rule_factory(iptc, family, table)
                for line in jumps:  # "-A CHAIN <spec>": delete the rule with that spec
                    words = line.split()
                    iptc.Chain(table, words[1]).delete_rule(build_rule(factory, words[2:]))
                for own in chains:
                    table.flush_entries(own)
                    table.delete_chain(own)
                table.commit()
            finally:
                table.close()
