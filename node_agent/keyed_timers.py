"""A table of delayed calls, at most one per key (a pod's uid): the agent's deferred work on
a pod that leaves (the ZDS Del after the grace, the end of a departure's drain).

Invariants:
- Scheduling a key again replaces its pending call; ``cancel`` drops it. A call that is
  dropped never runs, and its ``cleanup`` runs at once, so what it holds (a namespace
  handle) is released on every path, not only when the call fires.
- A call that fires runs its ``cleanup`` afterwards, whatever the call raised; a failure is
  logged (a timer thread has nobody to raise to).
- With a ``guard`` lock, a firing call holds it while it checks that it is still wanted and
  runs, and ``cancel`` waits for it: after ``cancel`` returns, no call of that key is left
  running or still to run (a deferred Del can never overtake the Add that cancelled it).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

log = logging.getLogger("node_agent.keyed_timers")


@dataclass(frozen=True)
class _Entry:
    timer: threading.Timer
    call: Callable[[], None]
    cleanup: Callable[[], None] | None


class KeyedTimers:
    def __init__(self, guard: threading.Lock | None = None) -> None:
        self._lock = threading.Lock()
        self._guard = guard
        self._entries: dict[str, _Entry] = {}

    def schedule(
        self,
        key: str,
        delay: float,
        call: Callable[[], None],
        cleanup: Callable[[], None] | None = None,
    ) -> None:
        timer = threading.Timer(delay, self._fire, args=(key,))
        timer.daemon = True
        entry = _Entry(timer, call, cleanup)
        with self._lock:
            old = self._entries.pop(key, None)
            self._entries[key] = entry
        if old is not None:
            self._drop(old)
        timer.start()

    def cancel(self, key: str) -> None:
        with self._lock:
            old = self._entries.pop(key, None)
        if old is not None:
            self._drop(old)
        with self._guarded():  # a call already firing finishes first
            pass

    def pending(self) -> int:
        with self._lock:
            return len(self._entries)

    def _guarded(self) -> AbstractContextManager[object]:
        return self._guard if self._guard is not None else nullcontext()

    @staticmethod
    def _drop(entry: _Entry) -> None:
        entry.timer.cancel()
        if entry.cleanup is not None:
            entry.cleanup()

    def _fire(self, key: str) -> None:
        with self._guarded():
            with self._lock:
                entry = self._entries.get(key)
                if entry is None or entry.timer is not threading.current_thread():
                    return  # replaced or cancelled meanwhile: its cleanup already ran
                del self._entries[key]
            try:
                entry.call()
            except Exception as e:
                log.warning("deferred work failed", extra={"fields": {"uid": key, "error": str(e)}})
            finally:
                if entry.cleanup is not None:
                    entry.cleanup()
