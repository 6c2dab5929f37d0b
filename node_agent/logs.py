"""Structured logging with the pod attached, as JSON lines or Istio's text lines.

JSON (the default; ``--log_as_json`` / ``LOG_AS_JSON=true``): every record is one JSON
object per line: ``time``, ``level``, ``logger``, ``msg`` (a short lowercase event phrase)
and any fields passed through ``extra={"fields": {...}}``. Text (``LOG_AS_JSON=false``, the
format of Istio's agent without ``--log_as_json``): ``time<TAB>level<TAB>logger<TAB>msg``,
then a TAB and the fields as ``key=value`` separated by spaces (nested ones as
``pod.namespace=...``), the time in Istio's form (UTC, microseconds). A
:class:`PodLogger` puts ``{namespace, name, uid}`` of a pod on every record it emits.
Levels mean: info for lifecycle, debug for steps, warning when degraded, error when an
operator must act (and the message says what to do).

The level (``LOG_LEVEL`` / ``--log-level``) is understood as Istio's ``--log_output_level``
(its ``pkg/log`` options): comma-separated ``level`` or ``scope:level`` entries, levels
``debug``, ``info``, ``warn`` (``warning`` too), ``error``, ``none`` (nothing). An entry
without a scope sets the ``default`` scope; the scope ``all`` sets every scope; the scopes of
Istio's CNI agent map onto our loggers (:data:`SCOPES`), and unknown scopes are ignored, as
Istio ignores them. A malformed entry or level is refused with one line (:func:`parse_levels`).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping, MutableMapping
from typing import Any

from cni_plugin.errors import ConfigError


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


class TextFormatter(logging.Formatter):
    """Istio's console line (its ``pkg/log`` without JSON): one record per line, no newline
    inside (a message's own newlines are escaped so one record stays one line)."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        micros = int((record.created % 1) * 1_000_000)
        level = "warn" if record.levelno == logging.WARNING else record.levelname.lower()
        parts = [f"{stamp}.{micros:06d}Z", level, record.name, record.getMessage()]
        pairs: list[str] = []
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            pairs.extend(_pairs("", fields))
        if record.exc_info and record.exc_info[1] is not None:
            pairs.append(f"error={type(record.exc_info[1]).__name__}: {record.exc_info[1]}")
        if pairs:
            parts.append(" ".join(pairs))
        return "\t".join(parts).replace("\n", "\\n")


def _pairs(prefix: str, fields: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    for key, value in fields.items():
        if isinstance(value, Mapping):
            out.extend(_pairs(f"{prefix}{key}.", value))
        else:
            out.append(f"{prefix}{key}={value}")
    return out


NONE = logging.CRITICAL + 10  # above every level: the scope logs nothing
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "none": NONE,
}
# Istio's scope names (and ours) -> the logger they set; "" is the root logger.
SCOPES = {
    "default": "",
    "cni": "node_agent",
    "cni-agent": "node_agent",
    "ambient": "node_agent",
    "cni-plugin": "node_agent.plugin",
    "cniplugin": "node_agent.plugin",
    "install": "install",
    "ztunnel": "node_agent.zds",
    "zds": "node_agent.zds",
}


def parse_levels(spec: str) -> dict[str, int]:
    """Logger name ("" = root) -> level, from Istio's ``scope:level,...`` form."""
    out: dict[str, int] = {}
    for raw in spec.split(","):
        entry = raw.strip()
        pieces = entry.split(":")
        if len(pieces) > 2 or not entry:
            raise ConfigError(_bad_level(spec, f"entry {entry!r} is not level or scope:level"))
        scope, level = ("default", pieces[0]) if len(pieces) == 1 else pieces
        value = LEVELS.get(level.strip().lower())
        if value is None:
            raise ConfigError(_bad_level(spec, f"{level.strip()!r} is not a level"))
        scope = scope.strip().lower()
        if scope == "all":
            out = {name: value for name in set(SCOPES.values())}
            continue
        if scope in SCOPES:
            out[SCOPES[scope]] = value
    return out


def _bad_level(spec: str, why: str) -> str:
    return (
        f"log level {spec[:80]!r}: {why}; use a level (debug, info, warn, error, none) or "
        "Istio's form scope:level,... such as default:info,cni:debug"
    )


def configure(level: str = "info", stream: Any = None, as_json: bool = True) -> None:
    """Send all logging to ``stream`` (stderr by default) at ``level`` (see the module
    docstring for the grammar; :class:`ConfigError` when it is malformed), as JSON lines or,
    with ``as_json=False``, Istio's text lines."""
    levels = parse_levels(level)  # before touching any logger: a refusal changes nothing
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if as_json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(levels.pop("", logging.INFO))
    for name in set(SCOPES.values()) - {""}:
        logging.getLogger(name).setLevel(levels.get(name, logging.NOTSET))


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
