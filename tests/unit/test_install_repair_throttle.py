"""The installer's repair throttle (Istio's installationThrottle) and its retry of a failed
attempt: one repair free per interval, a sooner one waits at most a second, a fight is named
in one warning line; a config caught half-written is retried even when the write that
completes it landed before the installer's watch."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import pytest

from install.installer import Installer
from install.repair_throttle import FIGHT_HITS, MAX_REPAIR_WAIT_S, RepairThrottle
from install.watcher import ChangeWatcher, InotifyWatcher, Waker
from tests.unit.test_install_conflist import ref
from tests.unit.test_install_installer import config, node, put, started

__all__ = ["node", "started"]  # fixtures, imported for pytest


class Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> bool:
        self.slept.append(seconds)
        self.now += seconds
        return False


def test_one_repair_free_per_interval_and_sooner_ones_wait_at_most_a_second() -> None:
    clock = Clock()
    t = RepairThrottle(5.0, clock, clock.sleep)
    t.before_repair("c")  # the first install: no wait
    clock.now += 0.3
    t.before_repair("c")  # a change 0.3 s later: waits 1 s, not the 4.7 s left
    clock.now += 2.0
    t.before_repair("c")
    clock.now += 6.0
    t.before_repair("c")  # quiet for longer than the interval: free again
    assert clock.slept == [MAX_REPAIR_WAIT_S, MAX_REPAIR_WAIT_S]
    assert t.quick_repeats == 0


def test_a_fight_is_named_in_one_warning_line(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    t = RepairThrottle(5.0, clock, clock.sleep)
    caplog.set_level(logging.WARNING, logger="install")
    for _ in range(3 * FIGHT_HITS):
        t.before_repair("/etc/cni/net.d/05-cilium.conflist")
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert "/etc/cni/net.d/05-cilium.conflist" in warnings[0]
    assert "another component" in warnings[0]


def test_a_half_written_config_completed_before_the_watch_is_still_repaired(
    node: dict[str, str], started: Callable[[Installer], Installer]
) -> None:
    path = os.path.join(node["net"], "10-list.conflist")
    whole = ref("list.conflist")
    put(path, whole[: len(whole) // 2])  # its owner is half-way through writing it
    calls = [0]

    def watch_after_the_write_completes(paths: list[str], waker: Waker) -> ChangeWatcher:
        # The owner finishes the file between the installer's failed read and its watch.
        calls[0] += 1
        if calls[0] == 1:
            put(path, whole)
        return InotifyWatcher(paths, waker)

    inst = started(
        Installer(
            config(node, cni_conf_name="10-list.conflist", min_repair_interval_s=0.5),
            watcher_factory=watch_after_the_write_completes,
        )
    )
    assert inst.wait_ready(5), inst.last_error
    assert inst.check() is None
