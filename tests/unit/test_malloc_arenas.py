"""The agent's malloc arena cap, measured in glibc itself: threads that allocate get arenas
of their own unless capped (glibc's ``malloc_info`` lists one ``<heap>`` per arena)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.plugin_fakes import ROOT

PROBE = """
import ctypes, sys, threading
sys.path.insert(0, ROOT)
from node_agent.malloc_arenas import cap_malloc_arenas
if CAP:
    print(cap_malloc_arenas(), file=sys.stderr)
held = []
together = threading.Barrier(6)
def work():
    together.wait()  # all six alive at once: an exited thread's arena would be reused
    held.append(bytearray(200_000))  # above pymalloc's sizes: glibc malloc on this thread
    together.wait()
threads = [threading.Thread(target=work) for _ in range(6)]
for t in threads: t.start()
for t in threads: t.join()
libc = ctypes.CDLL(None)
libc.open_memstream.restype = ctypes.c_void_p
libc.open_memstream.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(ctypes.c_size_t)]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
buf, size = ctypes.c_char_p(), ctypes.c_size_t()
f = libc.open_memstream(ctypes.byref(buf), ctypes.byref(size))
libc.malloc_info(0, f)
libc.fclose(f)
print(buf.value.decode().count("<heap nr="))
"""


def _heaps(cap: bool, env: dict[str, str] | None = None) -> tuple[int, str]:
    code = PROBE.replace("ROOT", repr(ROOT)).replace("CAP", repr(cap))
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"} | (env or {}),
    )
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.strip()), proc.stderr


def test_threads_get_arenas_of_their_own_without_the_cap() -> None:
    heaps, _ = _heaps(cap=False)
    assert heaps >= 5  # the premise: what the cap is for


def test_the_cap_keeps_arenas_at_two() -> None:
    heaps, said = _heaps(cap=True)
    assert heaps <= 2, heaps
    assert "capped at 2" in said


def test_an_operators_malloc_arena_max_wins() -> None:
    heaps, said = _heaps(cap=True, env={"MALLOC_ARENA_MAX": "3"})
    assert "MALLOC_ARENA_MAX=3 from the environment" in said
    assert heaps <= 3


TRIM_PROBE = """
import gc, re, sys
sys.path.insert(0, ROOT)
from node_agent.malloc_arenas import trim_after_start
def rss_kb():
    return int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
chunks = [bytearray(1000) for _ in range(40_000)]  # ~40 MB in glibc malloc's main heap
keep = bytearray(1000)  # allocated last, at the heap's top: free() alone cannot shrink it
del chunks
before = rss_kb()
print(trim_after_start())
print(before - rss_kb(), gc.get_freeze_count())
"""


def test_trim_after_start_hands_freed_heap_back_and_freezes_survivors() -> None:
    """What start-up freed below the heap's top stays resident until ``malloc_trim``; the
    trim after ready returns it (here ~40 MB freed under a live top chunk) and freezes the
    surviving objects out of later collections."""
    out = subprocess.run(
        [sys.executable, "-c", TRIM_PROBE.replace("ROOT", repr(str(ROOT)))],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.splitlines()  # fmt: skip
    assert "heap trimmed" in out[0]
    released_kb, frozen = (int(x) for x in out[1].split())
    assert released_kb > 20_000 and frozen > 0, out
