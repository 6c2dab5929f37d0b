"""A cap on glibc's malloc arenas for the agent process (the memory goal of issue 5).

glibc gives each thread that allocates concurrently an arena of its own, up to 8 per core,
and never returns most of it. The agent runs its enrolment workers and a short-lived thread
per namespace entry, so a burst of enrolments grew RSS by ~25 MB with the nftables backend
(libnftables allocates in C on those threads) for no gain: the workers spend their time
waiting on the kernel and the API server, not contending on malloc. Two arenas keep that
memory flat (docs/benchmarks.md, "Node agent"). Must run before the agent starts threads;
an operator's own ``MALLOC_ARENA_MAX`` wins.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_ARENA_MAX = -8  # <malloc.h>
DEFAULT_ARENAS = 2


def cap_malloc_arenas(arenas: int = DEFAULT_ARENAS) -> str:
    """Apply the cap; returns what was done, for the start-up log."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return f"MALLOC_ARENA_MAX={os.environ['MALLOC_ARENA_MAX']} from the environment"
    name = ctypes.util.find_library("c")
    if name is None:
        return "no C library found: malloc arenas left uncapped"
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return f"{name} has no mallopt (not glibc): malloc arenas left uncapped"
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if mallopt(M_ARENA_MAX, arenas) != 1:
        return "mallopt(M_ARENA_MAX) refused: malloc arenas left uncapped"
    return f"malloc arenas capped at {arenas}"
