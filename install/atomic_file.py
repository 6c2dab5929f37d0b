"""Atomic file replacement: readers see the old bytes or the new bytes, never a mix.

Write to a temporary file in the same directory, fsync, set the mode, rename over the
target. The container runtime may read the conf dir or exec the plugin at any moment.
"""

from __future__ import annotations

import contextlib
import os
import tempfile


def atomic_write(
    path: str, data: bytes, mode: int, *, unless_changed: tuple[str, bytes] | None = None
) -> bool:
    """Replace ``path`` with ``data``; True when done. With ``unless_changed=(other, seen)``
    nothing is replaced (False) when ``other`` no longer holds ``seen`` just before the
    rename: its owner rewrote it while ours was being prepared (the fsync can take long on a
    busy node), and renaming over it would silently lose that write."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        if unless_changed is not None and read_bytes(unless_changed[0]) != unless_changed[1]:
            os.unlink(tmp)
            return False
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return True


def read_bytes(path: str) -> bytes | None:
    """The file's bytes, or None when it does not exist."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None
