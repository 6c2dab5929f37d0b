"""CoalescingWriter: concurrent submits merge into few writes; each caller sees its own
lines written (or the write's error) before it returns."""

from __future__ import annotations

import threading
import time

import pytest

from node_agent.host_probe import CoalescingWriter


def test_bursts_coalesce_and_every_caller_waits_for_its_lines() -> None:
    written: list[list[str]] = []
    gate = threading.Event()

    def write(lines: list[str]) -> None:
        gate.wait(2)
        written.append(lines)

    w = CoalescingWriter(write)
    returned: dict[int, bool] = {}

    def caller(i: int) -> None:
        w.submit([f"add set 10.0.0.{i}"])
        returned[i] = any(f"add set 10.0.0.{i}" in b for b in written)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    time.sleep(0.2)  # the first caller's write is blocked: the other 19 queue behind it
    gate.set()
    for t in threads:
        t.join()
    assert sum(len(b) for b in written) == 20
    assert w.writes == len(written) <= 3
    assert all(returned[i] for i in range(20))


def test_errors_reach_every_caller_of_the_batch() -> None:
    def write(lines: list[str]) -> None:
        raise RuntimeError("ipset failed")

    w = CoalescingWriter(write)
    with pytest.raises(RuntimeError, match="ipset failed"):
        w.submit(["x"])
    with pytest.raises(RuntimeError):
        w.submit(["y"])  # the writer is usable again after an error
