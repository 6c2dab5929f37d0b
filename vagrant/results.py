"""What one run of the suite on one kernel produced, read from pytest's JUnit XML.

Counts are split by redirection backend: a test belongs to a backend when its id (pytest
parameter, function, class or module name) names exactly one of ``iptables``, ``nftables``,
``ebpf`` (or ``bpf``); everything else is ``common``. Skips keep their reason, so "the
kernel lacks X" is visible in the summary instead of disappearing into a count.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BACKENDS = ("iptables", "nftables", "ebpf")
# "bpf" alone (test_bpf_programs.py) is the ebpf backend's too; "bpffs" is not a match.
_BACKEND_WORD = re.compile(r"(?<![a-z])(iptables|nftables|e?bpf)(?![a-z])")


@dataclass
class Counts:
    passed: int = 0
    skipped: int = 0
    failed: int = 0

    @property
    def total(self) -> int:
        return self.passed + self.skipped + self.failed


@dataclass
class KernelResult:
    """The outcome on one kernel. ``ok`` only when pytest exited 0 and ran at least one test."""

    kernel: str
    backend: str  # "qemu-tcg" (virtme-ng guest) or "host"
    exit_code: int | None  # None: the guest never reported one (crash, timeout)
    wall_seconds: float
    test_seconds: float = 0.0
    by_backend: dict[str, Counts] = field(default_factory=dict)
    skip_reasons: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    missing_modules: list[str] = field(default_factory=list)
    error: str = ""
    # The host's 1-minute load average at start and end: TCG timings on a shared machine
    # mean little without it.
    host_load: tuple[float, float] = (0.0, 0.0)
    command: str = ""  # the command line that produced it, for docs/kernels.md

    @property
    def totals(self) -> Counts:
        t = Counts()
        for c in self.by_backend.values():
            t.passed += c.passed
            t.skipped += c.skipped
            t.failed += c.failed
        return t

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.totals.failed == 0 and self.totals.total > 0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["totals"] = asdict(self.totals)
        d["ok"] = self.ok
        return d


def result_from_json(d: dict[str, Any]) -> KernelResult:
    """The inverse of :meth:`KernelResult.to_json` (summary.json files)."""
    fields = {k: v for k, v in d.items() if k not in ("totals", "ok")}
    fields["by_backend"] = {b: Counts(**c) for b, c in d.get("by_backend", {}).items()}
    fields["host_load"] = tuple(d.get("host_load", (0.0, 0.0)))
    return KernelResult(**fields)


def backend_of(classname: str, name: str) -> str:
    found = {
        "ebpf" if w == "bpf" else w for w in _BACKEND_WORD.findall(f"{classname}.{name}".lower())
    }
    return found.pop() if len(found) == 1 else "common"


def read_junit(path: Path, result: KernelResult) -> None:
    """Fill ``result``'s counts, skip reasons, failures and test time from a JUnit file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    by_backend: dict[str, Counts] = {}
    reasons: Counter[str] = Counter()
    for suite in suites:
        result.test_seconds += float(suite.get("time", "0") or 0)
        for case in suite.iter("testcase"):
            classname, name = case.get("classname", ""), case.get("name", "")
            counts = by_backend.setdefault(backend_of(classname, name), Counts())
            bad = case.find("failure")
            if bad is None:
                bad = case.find("error")
            skip = case.find("skipped")
            if bad is not None:
                counts.failed += 1
                msg = (bad.get("message") or "").splitlines()[0:1]
                result.failures.append(f"{classname}::{name}: {' '.join(msg)}"[:300])
            elif skip is not None:
                counts.skipped += 1
                reasons[_skip_reason(skip.get("message", ""))] += 1
            else:
                counts.passed += 1
    result.by_backend = dict(sorted(by_backend.items()))
    result.skip_reasons = dict(reasons.most_common())


def read_progress(path: Path, result: KernelResult) -> None:
    """Fill ``result`` from the guest plugin's JSON lines (``vagrant/guest_plugin.py``):
    what finished when pytest itself did not (no JUnit file)."""
    outcome: dict[str, str] = {}
    messages: dict[str, str] = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut off by the guest's end
        node, state = rec["nodeid"], rec["outcome"]
        result.test_seconds += float(rec.get("duration", 0))
        # A test counts once: failed beats skipped beats passed, whichever phase said so.
        if state == "failed" or (state == "skipped" and outcome.get(node) != "failed"):
            outcome[node] = state
            messages[node] = rec.get("message", "")
        else:
            outcome.setdefault(node, state)
    by_backend: dict[str, Counts] = {}
    reasons: Counter[str] = Counter()
    for node, state in outcome.items():
        path_part, _, name = node.partition("::")
        counts = by_backend.setdefault(backend_of(path_part.replace("/", "."), name), Counts())
        if state == "failed":
            counts.failed += 1
            text = messages[node].splitlines()
            detail = next((ln for ln in text if ln.startswith("E ")), text[-1] if text else "")
            result.failures.append(f"{node}: {detail.removeprefix('E').strip()}"[:300])
        elif state == "skipped":
            counts.skipped += 1
            reasons[_skip_reason(messages[node].removeprefix("Skipped: "))] += 1
        else:
            counts.passed += 1
    result.by_backend = dict(sorted(by_backend.items()))
    result.skip_reasons = dict(reasons.most_common())


def _skip_reason(message: str) -> str:
    # pytest writes "path:line: reason" for skips raised in a test body.
    return re.sub(r"^\S+\.py:\d+: ", "", message).strip() or "(no reason given)"


TABLE_HEADER = [
    "| kernel | where | backend | passed | skipped | failed | run time | host load | command |",
    "|---|---|---|---|---|---|---|---|---|",
]


def markdown_rows(results: list[KernelResult]) -> list[str]:
    """Table rows for docs/kernels.md: one per kernel and backend with tests."""
    rows = []
    for r in results:
        command = r.command
        load = f"{r.host_load[0]:.0f}-{r.host_load[1]:.0f}"
        for backend, c in r.by_backend.items():
            rows.append(
                f"| {r.kernel} | {r.backend} | {backend} | {c.passed} | {c.skipped} | "
                f"{c.failed} | {r.wall_seconds:.0f} s | {load} | `{command}` |"
            )
        if not r.by_backend:
            rows.append(
                f"| {r.kernel} | {r.backend} | (no results: {r.error or 'see log'}) | - | - | - "
                f"| {r.wall_seconds:.0f} s | {load} | `{command}` |"
            )
    return rows
