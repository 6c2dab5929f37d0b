"""Applier: ``iptables-restore --noflush`` run inside the pod namespace.

Uses the same xtables variant (``legacy`` or ``nft``) the host uses, as Istio does, so the
pod's rules live where the node's tooling looks. The variant is detected once per process,
in the caller's own (host/node) namespace, and logged with the reason. Detection only reads:
it never creates tables or rules in the host namespace.

Each install is one restore invocation per family, the families' processes running
concurrently (they write disjoint tables); if the kernel rejects any part, whatever part was
committed is deleted again before the error is raised (atomic per call).

With the ``nft`` variant a restore also creates the nf_tables tables and base chains it
writes into (``table ip mangle`` with its ``PREROUTING`` chain, ...), which survive the
deletion of every rule. Removal therefore also deletes a table it emptied, when nothing but
empty accept-policy base chains is left in it, so the namespace is exactly as before
``apply`` (legacy tables are the kernel's and always exist: nothing to do there).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import socket
import struct
import subprocess

from cni_plugin.errors import ConfigError, RedirectionError
from cni_plugin.redirection.iptables_rules import Family, RuleSet
from cni_plugin.redirection.iptables_state import SavedTables, parse_save, removal_script

log = logging.getLogger(__name__)

VARIANTS = ("legacy", "nft")
_TIMEOUT_S = 30.0

NETLINK_NETFILTER = 12
_NFT_MSG_GETTABLE = (10 << 8) | 1  # NFNL_SUBSYS_NFTABLES, NFT_MSG_GETTABLE
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
# Per family: the nf_tables family iptables-nft writes, the legacy /proc table list.
_NFPROTO = {Family.IPV4: socket.AF_INET, Family.IPV6: socket.AF_INET6}
_NFT_FAMILY = {Family.IPV4: "ip", Family.IPV6: "ip6"}
_LEGACY_NAMES = {
    Family.IPV4: "/proc/thread-self/net/ip_tables_names",
    Family.IPV6: "/proc/thread-self/net/ip6_tables_names",
}


def _nft_table_families() -> set[int] | None:
    """The nf_tables families that have at least one table in the calling thread's
    namespace (one netlink dump), or None when that cannot be read."""
    try:
        with socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER
        ) as sock:
            sock.bind((0, 0))
            body = struct.pack("BBH", socket.AF_UNSPEC, 0, 0)
            hdr = struct.pack(
                "IHHII", 16 + len(body), _NFT_MSG_GETTABLE, _NLM_F_REQUEST | _NLM_F_DUMP, 1, 0
            )
            sock.send(hdr + body)
            found: set[int] = set()
            while True:
                data = sock.recv(1 << 16)
                off = 0
                while off + 16 <= len(data):
                    n, mtype = struct.unpack_from("IH", data, off)
                    if mtype == _NLMSG_DONE:
                        return found
                    if mtype == _NLMSG_ERROR or n < 20:
                        return None
                    found.add(data[off + 16])  # nfgenmsg.nfgen_family
                    off += (n + 3) & ~3
                if not data:
                    return None
    except OSError:
        return None


def _holds_no_tables(variant: str, families: list[Family]) -> list[bool]:
    """Per family: True only when the calling thread's namespace certainly has no table of
    that family in ``variant`` (so its save is empty and need not be run). Unknown = False."""
    if variant == "nft":
        present = _nft_table_families()
        if present is None:
            return [False] * len(families)
        return [_NFPROTO[f] not in present for f in families]
    out = []
    for f in families:
        try:
            with open(_LEGACY_NAMES[f], encoding="ascii") as names:
                out.append(not names.read().strip())
        except FileNotFoundError:
            out.append(True)  # the family's legacy tables module is not even loaded
        except OSError:
            out.append(False)
    return out


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


def emptied_tables_script(listing: str, family: Family, candidates: list[str]) -> str:
    """``nft -f`` input deleting each of ``candidates`` (xtables table names) that the
    ``nft -j list ruleset`` ``listing`` shows holding nothing but base chains with policy
    accept and no rules: what an iptables-nft restore leaves once its rules are gone. Any
    other object in a table (a rule, a regular chain, a set, a drop policy) keeps it. Pure."""
    fam = _NFT_FAMILY[family]
    try:
        objects = json.loads(listing).get("nftables", [])
    except (ValueError, AttributeError):
        return ""
    tables = {
        o["table"]["name"]
        for o in objects
        if isinstance(o, dict) and "table" in o and o["table"].get("family") == fam
    }
    keep: set[str] = set()
    for o in objects:
        if not isinstance(o, dict):
            continue
        kind, body = next(iter(o.items()), ("", {}))
        if kind in ("metainfo", "table") or not isinstance(body, dict):
            continue
        if body.get("family") != fam:
            continue
        base = kind == "chain" and "hook" in body and body.get("policy", "accept") == "accept"
        if not base:
            keep.add(str(body.get("table", "")))
    doomed = [t for t in candidates if t in tables and t not in keep]
    return "".join(f"delete table {fam} {t}\n" for t in doomed)


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
        return self._run_all([(argv, stdin)])[0]

    def _run_all(self, jobs: list[tuple[list[str], str | None]]) -> list[str]:
        """Run every job at once (one per family: the two restores or saves touch disjoint
        tables, so they may overlap) and wait for all; stdout of each, in order. The first
        failure is raised only after every process has been reaped."""
        procs: list[tuple[list[str], subprocess.Popen[str] | None, str | None]] = []
        try:
            for argv, stdin in jobs:
                procs.append((argv, *self._spawn(argv, stdin)))
        finally:
            outs, first_error = [], None
            for argv, proc, error in procs:
                out, err = "", error
                if proc is not None:
                    out, err = self._reap(argv, proc)
                if err is not None and first_error is None:
                    first_error = err
                outs.append(out)
        if first_error is not None:
            raise RedirectionError(first_error)
        return outs

    @staticmethod
    def _spawn(
        argv: list[str], stdin: str | None
    ) -> tuple[subprocess.Popen[str] | None, str | None]:
        # The input is written to a pipe before the process starts (a rule set is far
        # below the pipe's capacity), so several processes can run without a writer thread.
        rfd = subprocess.DEVNULL
        if stdin is not None:
            rfd, wfd = os.pipe()
            try:
                os.write(wfd, stdin.encode())
            finally:
                os.close(wfd)
        try:
            return (
                subprocess.Popen(
                    argv, stdin=rfd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                ),
                None,
            )
        except FileNotFoundError:
            return None, f"{argv[0]} is not installed: install the iptables package (make setup)"
        finally:
            if stdin is not None:
                os.close(rfd)

    @staticmethod
    def _reap(argv: list[str], proc: subprocess.Popen[str]) -> tuple[str, str | None]:
        try:
            out, err = proc.communicate(timeout=_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return "", f"{argv[0]} did not finish within {_TIMEOUT_S:.0f}s"
        if proc.returncode != 0:
            return out, f"{argv[0]} failed: {err.strip() or proc.returncode}"
        return out, None

    def save(self, family: Family) -> str:
        return self._run([self._cmd(family, "save")])

    def save_all(self, families: list[Family]) -> list[str]:
        """``save`` of each family, the processes running concurrently. A family with no
        table at all in the namespace (every fresh pod) saves as empty text without a
        process: the save would print nothing either."""
        empty = _holds_no_tables(self.variant, families)
        need = [f for f, e in zip(families, empty, strict=True) if not e]
        texts = iter(self._run_all([([self._cmd(f, "save")], None) for f in need]))
        return ["" if e else next(texts) for e in empty]

    def install(self, ruleset: RuleSet) -> None:
        self.install_all([ruleset])

    def install_all(self, rulesets: list[RuleSet]) -> None:
        """``install`` of each family's rule set, the restores running concurrently; on any
        failure every family's rules that made it in are deleted again."""
        jobs: list[tuple[list[str], str | None]] = [
            ([self._cmd(rs.family, "restore"), "--noflush", "-w", "5"], rs.restore_text() + "\n")
            for rs in rulesets
        ]
        try:
            self._run_all(jobs)
        except RedirectionError:
            # Legacy commits table by table, and one family may have succeeded: undo all.
            fams = [rs.family for rs in rulesets]
            for fam, text in zip(fams, self.save_all(fams), strict=True):
                self.uninstall(fam, parse_save(text))
            raise

    def uninstall(self, family: Family, saved: SavedTables) -> None:
        script = removal_script(saved)
        if not script:
            return
        self._run([self._cmd(family, "restore"), "--noflush", "-w", "5"], script)
        if self.variant == "nft":
            self._delete_emptied_tables(family, saved)

    def _delete_emptied_tables(self, family: Family, saved: SavedTables) -> None:
        touched = [t for t in sorted(saved.chains) if saved.own_chains(t) or saved.jumps_to_own(t)]
        listing = self._run(["nft", "-j", "list", "ruleset", _NFT_FAMILY[family]])
        script = emptied_tables_script(listing, family, touched)
        if script:
            self._run(["nft", "-f", "-"], script)
