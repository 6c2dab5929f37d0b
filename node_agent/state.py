"""The running agent's state, exported as one JSON file in its run dir for the operator
commands (``istio-cni-agent pods`` / ``pod NS/NAME``) to read.

Written atomically (temp file + rename) at most once per ``interval`` and only after a
change was signalled, so readers never see a torn file and a busy agent does not spend its
time serialising. The file names its writer's pid: a reader can tell a stale file (agent
gone) from a live one. Schema (``version`` 1)::

  {"version": 1, "pid": int, "node": str, "backend": str, "ready": bool,
   "ztunnel_connected": bool, "written_at": float, "started_at": float,
   "pods": [{"namespace", "name", "uid", "ips": [str], "node", "state", "decision",
             "annotation", "netns_inode", "zds", "last_error", "bypass_inbound",
             "enrolled_at", "latency_ms", "check": {"ok", "missing", "extra", "at"} | null}]}
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

SCHEMA_VERSION = 1


class StateExporter:
    def __init__(
        self, path: str, collect: Callable[[], dict[str, Any]], interval: float = 0.5
    ) -> None:
        self.path = path
        self.collect = collect
        self.interval = interval
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def touch(self) -> None:
        self._dirty.set()

    def write_now(self) -> None:
        doc = self.collect()
        doc["version"] = SCHEMA_VERSION
        doc["pid"] = os.getpid()
        doc["written_at"] = time.time()
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, separators=(",", ":"))
        os.replace(tmp, self.path)

    def start(self) -> None:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self.write_now()
        self._thread = threading.Thread(target=self._run, name="state", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._dirty.wait(timeout=5.0):
                self._dirty.clear()
            # Periodic rewrite even without changes keeps "written_at" fresh (liveness).
            with contextlib.suppress(OSError):
                self.write_now()
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._dirty.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        with contextlib.suppress(OSError):  # final state, with ready false
            self.write_now()


def read_state(path: str) -> dict[str, Any]:
    """Load a state file; raises OSError/ValueError for the caller to explain."""
    with open(path) as f:
        doc: dict[str, Any] = json.load(f)
    return doc


def writer_alive(doc: dict[str, Any]) -> bool:
    pid = doc.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
