"""WorkQueue: per-key serialisation, coalescing, retry with backoff, run_exclusive."""

from __future__ import annotations

import itertools
import threading
import time

from cni_plugin.errors import NotRetryableError
from node_agent.work_queue import WorkQueue
from tests.agent_fakes import wait_for


def test_one_worker_per_key_and_coalescing() -> None:
    active: dict[str, int] = {}
    overlap: list[str] = []
    runs: list[str] = []
    lock = threading.Lock()
    gate = threading.Event()

    def process(key: str) -> None:
        with lock:
            active[key] = active.get(key, 0) + 1
            if active[key] > 1:
                overlap.append(key)
            runs.append(key)
        if key == "a":
            gate.wait(2)
        time.sleep(0.01)
        with lock:
            active[key] -= 1

    q = WorkQueue(process, workers=4)
    q.start()
    try:
        q.add("a")
        wait_for(lambda: runs.count("a") == 1, what="a started")
        for _ in range(20):  # while "a" runs: coalesced into one rerun
            q.add("a")
        q.add("b")
        wait_for(lambda: "b" in runs, what="b runs while a is busy")
        gate.set()
        # Idle with nothing queued, processing or scheduled: no third run can follow.
        wait_for(lambda: q.idle() and len(q) == 0 and runs.count("a") == 2, what="one rerun")
        assert runs.count("a") == 2
        assert overlap == []
    finally:
        q.stop()


def test_failures_retry_with_backoff_then_forget() -> None:
    attempts: list[float] = []

    def process(key: str) -> None:
        attempts.append(time.monotonic())
        if len(attempts) < 3:
            raise RuntimeError("not yet")

    q = WorkQueue(process, workers=1, base_delay=0.05)
    q.start()
    try:
        q.add("k")
        wait_for(lambda: len(attempts) == 3 and q.idle(), what="three attempts")
        gaps = [b - a for a, b in itertools.pairwise(attempts)]
        assert gaps[0] >= 0.04 and gaps[1] >= 0.09  # 0.05 then 0.1
        assert q.failures("k") == 2
        q.forget("k")
        assert q.failures("k") == 0
    finally:
        q.stop()


def test_run_exclusive_blocks_workers_for_that_key() -> None:
    seen: list[str] = []
    inside = threading.Event()
    release = threading.Event()
    # A worker running the key while the holder still has it would record it unreleased.
    q = WorkQueue(lambda k: seen.append(k if release.is_set() else f"{k} while held"), workers=2)
    q.start()
    try:

        def hold() -> str:
            inside.set()
            release.wait(2)
            return "done"

        t = threading.Thread(target=lambda: q.run_exclusive("p", hold))
        t.start()
        inside.wait(2)
        q.add("p")
        assert not q.idle()  # the key is held: the add waits for the holder
        assert seen == []  # worker waits for the exclusive holder
        release.set()
        t.join()
        wait_for(lambda: seen == ["p"], what="queued key runs after the holder")
    finally:
        q.stop()


def test_not_retryable_failure_is_not_retried() -> None:
    """A NotRetryableError ends the key's retries (its failure count dropped) and is
    reported once; a later add runs the key again. Other errors keep their backoff."""
    attempts: list[str] = []
    given_up: list[tuple[str, str]] = []

    def process(key: str) -> None:
        attempts.append(key)
        if key == "rules":
            raise NotRetryableError("cannot install rules")
        if attempts.count(key) < 2:
            raise RuntimeError("transient")

    q = WorkQueue(
        process,
        workers=1,
        base_delay=0.01,
        on_not_retryable=lambda key, e: given_up.append((key, str(e))),
    )
    q.start()
    try:
        q.add("rules")
        q.add("flaky")
        wait_for(lambda: attempts.count("flaky") == 2 and q.idle() and len(q) == 0, what="idle")
        assert attempts.count("rules") == 1 and q.failures("rules") == 0
        assert given_up == [("rules", "cannot install rules")]
        q.add("rules")  # the pod changed: tried again, once
        wait_for(lambda: attempts.count("rules") == 2 and q.idle() and len(q) == 0, what="rerun")
        assert len(given_up) == 2
    finally:
        q.stop()
