"""Applier: ``iptables-restore --noflush`` run inside the pod namespace.

Uses the same xtables variant (``legacy`` or ``nft``) the host uses, as Istio does, so the
pod's rules live where the node's tooling looks. The variant is detected once per process,
in the caller's own (host/node) namespace, and logged with the reason. Detection only reads:
it never creates tables or rules in the host namespace.

Each install is one restore invocation per family; if the kernel rejects any part, whatever
part was committed is deleted again before the error is raised (atomic per call).
"""

from __future__ import annotations

import functools
import logging
import re
import subprocess

from cni_plugin.errors import ConfigError, RedirectionError
from cni_plugin.redirection.iptables_rules import Family, RuleSet
from cni_plugin.redirection.iptables_state import SavedTables, parse_save, removal_script

log = logging.getLogger(__name__)

VARIANTS = ("legacy", "nft")
_TIMEOUT_S = 30.0


def _rule_count(cmd: str) -> int:
    try:
        out = subprocess.run([cmd], capture_output=True, text=True, timeout=_TIMEOUT_S).stdout
    except (OSError, subprocess.TimeoutExpired):
        return -1
    return sum(1 for ln in out.splitlines() if ln.startswith("-A "))


@functools.cache
def detect_variant() -> tuple[str, str]:
    """(variant, reason): which xtables variant the host uses.

    The variant holding more rules in this process's namespace wins (that is where kubelet
    and kube-proxy put theirs); on a tie, the one the ``iptables`` alternative points to.
    """
    counts = {v: max(_rule_count(f"iptables-{v}-save"), 0) for v in VARIANTS}
    counts = {v: n + max(_rule_count(f"ip6tables-{v}-save"), 0) for v, n in counts.items()}
    if counts["legacy"] != counts["nft"]:
        variant = max(counts, key=lambda v: counts[v])
        return variant, f"host has {counts[variant]} {variant} rules ({counts})"
    try:
        version = subprocess.run(
            ["iptables", "--version"], capture_output=True, text=True, timeout=_TIMEOUT_S
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        version = ""
    variant = "legacy" if re.search(r"\(legacy\)", version) else "nft"
    return variant, f"no host rules in either variant; iptables --version: {version.strip()!r}"


class IptablesRestoreApplier:
    """Installs a :class:`RuleSet` with ``<family>-<variant>-restore --noflush``. Every method
    runs on a thread already inside the target namespace (subprocesses inherit it)."""

    name = "iptables-restore"

    def __init__(self, variant: str | None = None) -> None:
        if variant is None:
            variant, reason = detect_variant()
            log.info(
                "iptables variant detected",
                extra={"fields": {"variant": variant, "reason": reason}},
            )
        elif variant not in VARIANTS:
            raise ConfigError(f"unknown iptables variant {variant!r}: choose legacy or nft")
        self.variant = variant

    def describe(self) -> str:
        return f"iptables-restore ({self.variant})"

    def _cmd(self, family: Family, verb: str) -> str:
        return f"{family.command}-{self.variant}-{verb}"

    def _run(self, argv: list[str], stdin: str | None = None) -> str:
        try:
            done = subprocess.run(
                argv, input=stdin, capture_output=True, text=True, timeout=_TIMEOUT_S
            )
        except FileNotFoundError:
            raise RedirectionError(
                f"{argv[0]} is not installed: install the iptables package (make setup)"
            ) from None
        except subprocess.TimeoutExpired:
            raise RedirectionError(f"{argv[0]} did not finish within {_TIMEOUT_S:.0f}s") from None
        if done.returncode != 0:
            raise RedirectionError(f"{argv[0]} failed: {done.stderr.strip() or done.returncode}")
        return done.stdout

    def save(self, family: Family) -> str:
        return self._run([self._cmd(family, "save")])

    def install(self, ruleset: RuleSet) -> None:
        text = ruleset.restore_text() + "\n"
        try:
            self._run([self._cmd(ruleset.family, "restore"), "--noflush", "-w", "5"], text)
        except RedirectionError:
            # Legacy commits table by table: undo any table that made it in.
            self.uninstall(ruleset.family, parse_save(self.save(ruleset.family)))
            raise

    def uninstall(self, family: Family, saved: SavedTables) -> None:
        script = removal_script(saved)
        if script:
            self._run([self._cmd(family, "restore"), "--noflush", "-w", "5"], script)
