"""The plugin's logs: JSON lines on stderr, and a copy for the agent's ``log.sock``.

stdout belongs to the CNI result, so logs never go there. Each record is ``{"level",
"time", "msg"}`` plus fields (the pod, the container id). The records are kept and sent to
``<run_dir>/log.sock`` once, at exit, so the operator sees them in the agent's log
(``kubectl logs``) instead of the kubelet's journal. Stdlib only, no ``logging`` import.
"""

from __future__ import annotations

import sys
import time

from cni_plugin import json_codec

TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations only: ``typing`` imports ``re`` (ms per pod sandbox)
    from typing import Any, TextIO

_LEVELS = {"debug": 10, "info": 20, "warn": 30, "warning": 30, "error": 40, "none": 100}


class PluginLog:
    def __init__(self, level: str = "info", stream: TextIO | None = None) -> None:
        self.threshold = _LEVELS.get(level.lower(), 20)
        self.stream = stream if stream is not None else sys.stderr
        self.records: list[dict[str, Any]] = []
        self.fields: dict[str, Any] = {}

    def set_level(self, level: str) -> None:
        self.threshold = _LEVELS.get(level.lower(), self.threshold)

    def _emit(self, level: str, msg: str, fields: dict[str, Any]) -> None:
        if _LEVELS[level] < self.threshold:
            return
        now = time.time()
        record: dict[str, Any] = {
            "level": level,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
            + f".{int(now % 1 * 1e6):06d}Z",
            "msg": msg,
            "scope": "cni-plugin",
        }
        record.update(self.fields)
        record.update(fields)
        self.records.append(record)
        try:
            self.stream.write(json_codec.dumps(record) + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed stderr must not turn into a failed ADD

    def debug(self, msg: str, **fields: Any) -> None:
        self._emit("debug", msg, fields)

    def info(self, msg: str, **fields: Any) -> None:
        self._emit("info", msg, fields)

    def warn(self, msg: str, **fields: Any) -> None:
        self._emit("warn", msg, fields)

    def error(self, msg: str, **fields: Any) -> None:
        self._emit("error", msg, fields)
