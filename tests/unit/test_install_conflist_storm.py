"""Another CNI rewriting the conflist every 100 ms for 10 s (issue 14, "faults survived"):
the real installer (default 5 s repair limit) on real files with real inotify.

What must hold: our entry is back within 5 s after the storm (the issue's bar; with Istio's
throttle, at most a 1 s wait, it is back in about a second, asserted with margin for a
loaded machine); it is never in the file twice;
the other CNI's work is never lost (each version it writes carries a sequence number, and the
file after the repair holds its *last* version, not an older one our merge read); the
installer keeps repairing during the storm. The other CNI writes both ways real ones do:
in place (truncate and write, so a reader can catch a half-written file) and by rename.
An observer thread reads the file every few milliseconds the whole time; the figures
(time to restored, repairs, what was seen) are printed for docs/reliability.md.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from install import conflist
from install.atomic_file import atomic_write
from install.installer import Installer
from install.repair_throttle import MAX_REPAIR_WAIT_S
from tests.unit.test_install_installer import config, node, put, started

__all__ = ["node", "started"]  # fixtures, imported for pytest

STORM_S = 10.0
PERIOD_S = 0.1
RESTORE_LIMIT_S = 5.0


def other_cni(seq: int) -> bytes:
    """The other CNI's conflist, version ``seq`` (its own plugins only, no istio-cni)."""
    doc = {
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "plugins": [
            {"type": "bridge", "bridge": "cni0", "stormSeq": seq,
             "ipam": {"type": "host-local", "subnet": "10.85.0.0/16"}},
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }  # fmt: skip
    return json.dumps(doc, indent=2).encode() + b"\n"


@dataclass
class Seen:
    """What the observer read: one record per read that differed from the previous one."""

    reads: int = 0
    torn: int = 0  # not JSON: caught mid-way through the other CNI's in-place write
    versions: list[tuple[float, int, int]] = field(default_factory=list)  # (t, seq, entries)
    problems: list[str] = field(default_factory=list)


def observe(path: str, stop: threading.Event, seen: Seen) -> None:
    last = b""
    while not stop.is_set():
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            seen.problems.append("the conflist was missing")
            continue
        seen.reads += 1
        if data != last:
            last = data
            try:
                doc: Any = json.loads(data)
            except ValueError:
                seen.torn += 1
                continue
            plugins = doc.get("plugins", [])
            entries = sum(1 for p in plugins if p.get("type") == "istio-cni")
            seqs = [p["stormSeq"] for p in plugins if "stormSeq" in p]
            if [p.get("type") for p in plugins if p.get("type") != "istio-cni"] != [
                "bridge",
                "portmap",
            ] or len(seqs) != 1:
                seen.problems.append(f"the other CNI's plugins were lost or changed: {plugins}")
                continue
            seen.versions.append((time.monotonic(), seqs[0], entries))
        time.sleep(0.003)


def storm(path: str, seconds: float) -> tuple[int, float]:
    """Rewrite ``path`` every PERIOD_S for ``seconds``; (last seq, time of the last write)."""
    t0 = time.monotonic()
    seq = 0
    last = t0
    while True:
        tick = t0 + seq * PERIOD_S
        if tick > t0 + seconds:
            return seq, last
        time.sleep(max(0.0, tick - time.monotonic()))
        seq += 1
        data = other_cni(seq)
        if seq % 2:
            put(path, data)  # in place
        else:
            tmp = f"{path}.tmp"
            put(tmp, data)
            os.rename(tmp, path)
        last = time.monotonic()


def wait_for(pred: Callable[[], bool], timeout: float) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.005)
    return time.monotonic() - t0


def test_entry_survives_another_cni_rewriting_the_conflist_every_100ms(
    node: dict[str, str],
    started: Callable[[Installer], Installer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="install")
    path = os.path.join(node["net"], "10-list.conflist")
    put(path, other_cni(0))
    inst = started(Installer(config(node)))  # the real repair limit (5 s)
    assert inst.wait_ready(5)
    installs_before = inst.installs_total.get("SUCCESS", 0)
    seen, stop = Seen(), threading.Event()
    watcher = threading.Thread(target=observe, args=(path, stop, seen), daemon=True)
    watcher.start()
    try:
        last_seq, last_write = storm(path, STORM_S)

        def restored() -> bool:
            with open(path, "rb") as f:
                data = f.read()
            return conflist.has_entry(data, path) and f'"stormSeq": {last_seq}'.encode() in data

        try:
            elapsed = wait_for(restored, RESTORE_LIMIT_S + 2.0)
        except AssertionError:
            with open(path, "rb") as f:
                now = f.read()
            raise AssertionError(
                f"not restored with the storm's last version {last_seq}: ready={inst.ready} "
                f"error={inst.last_error} file={now!r}"
            ) from None
        # A little longer: a late, stale repair would show up here.
        time.sleep(0.5)
    finally:
        stop.set()
        watcher.join()
    with open(path, "rb") as f:
        final = conflist.loads(f.read(), path)
    repairs = inst.installs_total.get("SUCCESS", 0) - installs_before
    during = [v for v in seen.versions if v[0] <= last_write]
    print(
        f"\nconflist storm: {last_seq} rewrites in {STORM_S:.0f} s; {repairs} repairs; "
        f"restored {elapsed:.2f} s after the last rewrite; {seen.reads} reads, "
        f"{len(seen.versions)} versions seen ({seen.torn} torn by the in-place writes), "
        f"max entries in one version {max(v[2] for v in seen.versions)}"
    )
    assert seen.problems == []
    assert all(entries <= 1 for _, _, entries in seen.versions), "our entry was duplicated"
    assert elapsed <= RESTORE_LIMIT_S
    assert elapsed <= MAX_REPAIR_WAIT_S + 1.5  # the throttle's wait, not a whole interval
    # The repair merged the other CNI's last version: nothing it wrote was overwritten.
    assert [p.get("stormSeq") for p in final["plugins"]][:1] == [last_seq]
    assert [p["type"] for p in final["plugins"]] == ["bridge", "portmap", "istio-cni"]
    # It kept repairing during the storm, about once a second, not once per rewrite.
    assert sum(1 for _, _, entries in during if entries == 1) >= 3
    assert STORM_S / (MAX_REPAIR_WAIT_S + 1.5) <= repairs <= STORM_S / MAX_REPAIR_WAIT_S + 2
    fights = [r for r in caplog.records if "keeps changing" in r.getMessage()]
    assert len(fights) == 1
    assert inst.wait_ready(2) and inst.check() is None


def test_a_merge_never_renames_over_a_write_it_did_not_read(tmp_path: Any) -> None:
    # The other CNI's version 2 lands while our merge of version 1 is being prepared.
    path = str(tmp_path / "10-list.conflist")
    put(path, other_cni(2))
    assert not atomic_write(path, b"merged from 1", 0o644, unless_changed=(path, other_cni(1)))
    with open(path, "rb") as f:
        assert f.read() == other_cni(2)
    assert os.listdir(tmp_path) == ["10-list.conflist"]  # no temporary file left
    assert atomic_write(path, b"merged from 2", 0o644, unless_changed=(path, other_cni(2)))
    with open(path, "rb") as f:
        assert f.read() == b"merged from 2"
