"""A cap on glibc's malloc arenas for the agent process (the memory goal of issue 5).

glibc gives each thread that allocates concurrently an arena of its own, up to 8 per core,
and never returns most of it. The agent runs its enrolment workers and a short-lived thread
per namespace entry, so a burst of enrolments grew RSS by ~25 MB with the nftables backend
(libnftables allocates in C on those threads) for no gain: the workers spend their time
waiting on the kernel and the API server, not contending on malloc. Two arenas keep that
memory flat (docs/benchmarks.md, "Node agent"). Must run before the agent starts threads;
an operator's own ``MALLOC_ARENA_MAX`` wins.

:func:`trim_after_start` runs once the agent is ready: a full collection, the survivors
frozen out of later collections (the imported modules and the start-up's objects live as
long as the process), and ``malloc_trim`` handing the heap that start-up freed (the
informers' first lists, import-time garbage) back to the kernel.
"""

from __future__ import annotations

import ctypes
import gc
import os

M_ARENA_MAX = -8  # <malloc.h>
DEFAULT_ARENAS = 2


def cap_malloc_arenas(arenas: int = DEFAULT_ARENAS) -> str:
    """Apply the cap; returns what was done, for the start-up log."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return f"MALLOC_ARENA_MAX={os.environ['MALLOC_ARENA_MAX']} from the environment"
    try:
        # The process's own symbols (its libc among them): ctypes.util.find_library would
        # run ldconfig in a subprocess, 0.16 s of the start on a loaded node (measured).
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "no mallopt in this process's C library (not glibc): malloc arenas left uncapped"
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if mallopt(M_ARENA_MAX, arenas) != 1:
        return "mallopt(M_ARENA_MAX) refused: malloc arenas left uncapped"
    return f"malloc arenas capped at {arenas}"


def trim_after_start() -> str:
    """Collect, freeze, trim (module docstring); returns what was done, for the log."""
    gc.collect()
    gc.freeze()
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the process's own libc: no library search
    except (OSError, AttributeError):
        return f"{gc.get_freeze_count()} objects frozen; no malloc_trim (not glibc)"
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    released = trim(0)
    return f"{gc.get_freeze_count()} objects frozen; heap trimmed (released: {bool(released)})"
