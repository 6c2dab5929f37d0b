"""What an install can leave on the testbed node, captured so that two moments compare:
the node's CNI files, the istio-cni run dir, the rules and sets in the node's network
namespace, and the ebpf backend's pins.

Role: :meth:`NodeState.take` before ``helm install`` and after ``helm uninstall``;
:func:`differences` says, per kind, what appeared, vanished or changed (empty = the node
is as it was). Counters and kubelet's own chains are the node's, present both times.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.node import Testbed

RULE_DUMPS = (
    ("iptables-save",),
    ("iptables-legacy-save",),
    ("ip6tables-save",),
    ("ip6tables-legacy-save",),
    ("nft", "list", "ruleset"),
)


def _files(root: Path) -> dict[str, str]:
    """relative path -> sha256 of the content (``->target`` for links, ``socket``...)."""
    out: dict[str, str] = {}
    if not root.exists():
        return out
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "->" + str(p.readlink())
        elif p.is_file():
            try:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()[:16]
            except OSError:  # a pinned BPF object (program, map, link): not readable as bytes
                out[rel] = "pinned"
        elif p.is_socket():
            out[rel] = "socket"
    return out


def _without_empty_tables(lines: list[str]) -> list[str]:
    """Drop tables with no rules: iptables-nft creates a family's ``nat`` table with its
    built-in chains on first use and never deletes it; empty, it is the same as absent."""
    out: list[str] = []
    block: list[str] = []
    for ln in lines:
        if ln.startswith("*") or ln.startswith("table "):
            block = [ln]
            continue
        if block:
            block.append(ln)
            if ln == "COMMIT" or ln == "}":
                body = block[1:-1]
                has_rules = any(
                    b.startswith("-A ")
                    or not (
                        b.startswith(":")
                        or b.strip().startswith(("chain ", "type ", "}", "policy "))
                    )
                    for b in body
                )
                if has_rules:
                    out += block
                block = []
            continue
        out.append(ln)
    return out + block


def _rules(text: str) -> list[str]:
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    lines = _without_empty_tables(lines)
    # packet/byte counters (iptables-save's [p:b], nft's "packets p bytes b") move on
    lines = [re.sub(r"packets \d+ bytes \d+", "", ln) for ln in lines]
    return [re.sub(r"\[\d+:\d+\]", "", ln).rstrip() for ln in lines]


@dataclass(frozen=True)
class NodeState:
    files: dict[str, dict[str, str]]
    rules: dict[str, list[str]]
    ipsets: list[str]
    pins: dict[str, str]

    @classmethod
    def take(cls, bed: Testbed, info: dict[str, Any]) -> NodeState:
        files = {
            "cni_bin_dir": _files(Path(info["cni_bin_dir"])),
            "cni_conf_dir": _files(Path(info["cni_conf_dir"])),
            "istio_cni_run_dir": _files(Path(info["istio_cni_run_dir"])),
        }
        rules: dict[str, list[str]] = {}
        for argv in RULE_DUMPS:
            proc = bed.node_exec(list(argv), check=False)
            rules[" ".join(argv)] = _rules(proc.stdout) if proc.returncode == 0 else []
        sets = bed.node_exec(["ipset", "list", "-n"], check=False).stdout.split()
        return cls(files, rules, sorted(sets), _files(Path(info["bpf_pin_root"])))

    def as_dict(self) -> dict[str, Any]:
        return {"files": self.files, "rules": self.rules, "ipsets": self.ipsets,
                "pins": self.pins}  # fmt: skip


def _dict_diff(a: dict[str, str], b: dict[str, str]) -> list[str]:
    out = [f"+ {k}" for k in sorted(b.keys() - a.keys())]
    out += [f"- {k}" for k in sorted(a.keys() - b.keys())]
    out += [f"~ {k}" for k in sorted(a.keys() & b.keys()) if a[k] != b[k]]
    return out


def differences(before: NodeState, after: NodeState) -> dict[str, list[str]]:
    """kind -> ``+ x`` (appeared), ``- x`` (vanished), ``~ x`` (changed); empty kinds left out."""
    out: dict[str, list[str]] = {}
    for name in before.files:
        d = _dict_diff(before.files[name], after.files.get(name, {}))
        if d:
            out[name] = d
    for dump, lines in before.rules.items():
        now = after.rules.get(dump, [])
        d = [f"+ {ln}" for ln in now if ln not in lines] + [f"- {ln}" for ln in lines
                                                           if ln not in now]  # fmt: skip
        if d:
            out[dump] = d
    d = [f"+ {s}" for s in after.ipsets if s not in before.ipsets]
    d += [f"- {s}" for s in before.ipsets if s not in after.ipsets]
    if d:
        out["ipset"] = d
    d = _dict_diff(before.pins, after.pins)
    if d:
        out["bpffs pins"] = d
    return out
