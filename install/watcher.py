"""Waiting for changes in the installer's directories with inotify (no polling).

One :class:`InotifyWatcher` per check cycle, created *before* the installer checks its work
so that nothing changed after the check goes unnoticed (Istio does the same). A pipe lets
:meth:`wake` interrupt a wait from another thread, so stopping never waits for a timeout.
"""

from __future__ import annotations

import contextlib
import os
import select
from collections.abc import Sequence
from typing import Protocol

from inotify_simple import INotify, flags

_MASK = (
    flags.CREATE
    | flags.DELETE
    | flags.MODIFY
    | flags.CLOSE_WRITE
    | flags.MOVED_FROM
    | flags.MOVED_TO
    | flags.ATTRIB
    | flags.DELETE_SELF
    | flags.MOVE_SELF
)


class ChangeWatcher(Protocol):
    def wait(self, timeout: float | None) -> bool:
        """True when something changed; False on timeout or wake-up."""

    def close(self) -> None: ...


class Waker:
    """A self-pipe: :meth:`wake` makes every current and later wait return (until reset)."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self.write_fd, b"x")

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


class InotifyWatcher:
    """Watches directories (and files' parent directories) for any change."""

    def __init__(self, paths: Sequence[str], waker: Waker) -> None:
        self._inotify = INotify()
        self._waker = waker
        self.watched: list[str] = []
        try:
            for path in dict.fromkeys(paths):
                if os.path.isdir(path):
                    self._inotify.add_watch(path, _MASK)
                    self.watched.append(path)
        except BaseException:
            self._inotify.close()
            raise

    def wait(self, timeout: float | None) -> bool:
        ready, _, _ = select.select([self._inotify.fileno(), self._waker.read_fd], [], [], timeout)
        if self._inotify.fileno() in ready:
            # Coalesce a burst (an atomic rename is several events) into one change.
            self._inotify.read(timeout=0, read_delay=50)
            return True
        return False

    def close(self) -> None:
        self._inotify.close()
