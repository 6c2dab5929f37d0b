"""Structured JSON logging with the pod attached.

Every record is one JSON object per line: ``time``, ``level``, ``logger``, ``msg`` (a short
lowercase event phrase) and any fields passed through ``extra={"fields": {...}}``. A
:class:`PodLogger` puts ``{namespace, name, uid}`` of a pod on every record it emits.
Levels mean: info for lifecycle, debug for steps, warning when degraded, error when an
operator must act (and the message says what to do).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping, MutableMapping
from typing import Any


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            out.update(fields)
        if record.exc_info and record.exc_info[1] is not None:
            out["error"] = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
        return json.dumps(out, default=str)


def configure(level: str = "info", stream: Any = None) -> None:
    """Send all logging to ``stream`` (stderr by default) as JSON lines at ``level``."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class PodLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A logger that attaches a pod's namespace, name and uid to every record."""

    def __init__(self, logger: logging.Logger, namespace: str, name: str, uid: str) -> None:
        super().__init__(logger, {"pod": {"namespace": namespace, "name": name, "uid": uid}})

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        extra = dict(kwargs.get("extra") or {})
        fields = dict(extra.get("fields") or {})
        fields.update(self.extra or {})
        extra["fields"] = fields
        kwargs["extra"] = extra
        return msg, kwargs
