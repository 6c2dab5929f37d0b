"""A keyed work queue: each pod is handled by one worker at a time, repeats coalesce,
failures come back after an exponential backoff, except :class:`NotRetryableError`
(the handler says retrying cannot help): that key's failure count is dropped, it is
reported through ``on_not_retryable`` and not scheduled again (a later ``add`` runs it).

Invariants: a key is queued at most once; a key being processed is never handed to a
second worker (an ``add`` meanwhile marks it dirty and it runs again afterwards); the
handler reads the *latest* state for a key (level-triggered), so coalescing loses nothing.
:meth:`run_exclusive` lets another thread (the plugin-event server) do work for a key
under the same serialisation.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TypeVar

from cni_plugin.errors import NotRetryableError

log = logging.getLogger("node_agent.work_queue")
T = TypeVar("T")


class WorkQueue:
    def __init__(
        self,
        process: Callable[[str], None],
        *,
        workers: int = 4,
        base_delay: float = 0.2,
        max_delay: float = 30.0,
        on_not_retryable: Callable[[str, NotRetryableError], None] = lambda key, error: None,
    ) -> None:
        self._process = process
        self._on_not_retryable = on_not_retryable
        self._workers = workers
        self._base = base_delay
        self._max = max_delay
        self._cond = threading.Condition()
        self._queue: deque[str] = deque()
        self._queued: set[str] = set()
        self._processing: set[str] = set()
        self._dirty: set[str] = set()
        self._delayed: list[tuple[float, str]] = []
        self._failures: dict[str, int] = {}
        self._stop = False
        self._threads: list[threading.Thread] = []

    # -- producers -----------------------------------------------------------------------
    def add(self, key: str) -> None:
        with self._cond:
            self._add_locked(key)

    def _add_locked(self, key: str) -> None:
        if key in self._processing:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._queue.append(key)
            self._cond.notify()

    def add_after(self, key: str, delay: float) -> None:
        with self._cond:
            heapq.heappush(self._delayed, (time.monotonic() + delay, key))
            self._cond.notify()

    def retry(self, key: str) -> float:
        """Schedule ``key`` again after its backoff; returns the delay chosen."""
        with self._cond:
            n = self._failures.get(key, 0)
            self._failures[key] = n + 1
        delay: float = min(self._max, self._base * 2.0**n)
        self.add_after(key, delay)
        return delay

    def forget(self, key: str) -> None:
        with self._cond:
            self._failures.pop(key, None)

    def failures(self, key: str) -> int:
        with self._cond:
            return self._failures.get(key, 0)

    def __len__(self) -> int:
        with self._cond:
            return len(self._queue) + len(self._processing) + len(self._delayed)

    def idle(self) -> bool:
        with self._cond:
            return not self._queue and not self._processing

    # -- consumers -----------------------------------------------------------------------
    def start(self) -> None:
        for i in range(self._workers):
            t = threading.Thread(target=self._worker, name=f"worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))

    def run_exclusive(self, key: str, work: Callable[[], T]) -> T:
        """Run ``work`` holding ``key`` (waits while a worker has it)."""
        with self._cond:
            while key in self._processing:
                self._cond.wait()
            self._processing.add(key)
        try:
            return work()
        finally:
            self._release(key)

    def _release(self, key: str) -> None:
        with self._cond:
            self._processing.discard(key)
            if key in self._dirty:
                self._dirty.discard(key)
                self._add_locked(key)
            self._cond.notify_all()

    def _next(self) -> str | None:
        with self._cond:
            while not self._stop:
                now = time.monotonic()
                while self._delayed and self._delayed[0][0] <= now:
                    _, k = heapq.heappop(self._delayed)
                    self._add_locked(k)
                for _ in range(len(self._queue)):
                    k = self._queue.popleft()
                    if k in self._processing:  # held by run_exclusive: rerun afterwards
                        self._queued.discard(k)
                        self._dirty.add(k)
                        continue
                    self._queued.discard(k)
                    self._processing.add(k)
                    return k
                wait = self._delayed[0][0] - now if self._delayed else None
                self._cond.wait(timeout=wait)
            return None

    def _worker(self) -> None:
        while True:
            key = self._next()
            if key is None:
                return
            try:
                self._process(key)
            except NotRetryableError as e:
                self.forget(key)
                log.warning(
                    "work failed, will not retry",
                    extra={"fields": {"key": key, "error": str(e)}},
                )
                self._on_not_retryable(key, e)
            except Exception:
                delay = self.retry(key)
                log.warning(
                    "work failed, will retry",
                    exc_info=True,
                    extra={"fields": {"key": key, "retry_in_s": round(delay, 2)}},
                )
            finally:
                self._release(key)
