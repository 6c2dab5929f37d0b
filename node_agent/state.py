"""The running agent's state file (``agent-state.json`` in its run dir): one typed,
versioned record, written by the agent and read back by ``istio-cni-agent pods`` / ``pod``
through the same :class:`AgentState`.

Written atomically (temp file + rename) at most once per ``interval`` and only after a
change was signalled, so readers never see a torn file and a busy agent does not spend its
time serialising. The record names its writer's pid: a reader can tell a stale file (agent
gone) from a live one. A file of another schema ``version`` is refused with a message
saying so (agent and CLI come from one image, so that means two installations mixed up).
The JSON shape is the record's field names, in order (the testbed reads it as JSON too).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

SCHEMA_VERSION = 1
STATE_FILE = "agent-state.json"


@dataclass(frozen=True)
class RuleCheck:
    """The reconciler's last rule check of one pod (``repaired_ok`` after a repair)."""

    ok: bool
    missing: tuple[str, ...] = ()
    extra: tuple[str, ...] = ()
    at: float = 0.0
    repaired_ok: bool | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "ok": self.ok,
            "missing": list(self.missing),
            "extra": list(self.extra),
            "at": self.at,
        }
        if self.repaired_ok is not None:
            out["repaired_ok"] = self.repaired_ok
        return out

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> RuleCheck:
        repaired = doc.get("repaired_ok")
        return cls(
            ok=bool(doc.get("ok")),
            missing=tuple(doc.get("missing") or ()),
            extra=tuple(doc.get("extra") or ()),
            at=float(doc.get("at") or 0.0),
            repaired_ok=None if repaired is None else bool(repaired),
        )


@dataclass(frozen=True)
class PodRecord:
    """One pod of this node as the agent sees it. ``state`` is "" for pods the agent does
    not hold (a :class:`~node_agent.pod_cache.PodState` value otherwise)."""

    namespace: str
    name: str
    uid: str = ""
    ips: tuple[str, ...] = ()
    node: str = ""
    phase: str = ""
    host_network: bool = False
    state: str = ""
    decision: str = ""
    annotation: str | None = None
    netns_inode: int | None = None
    zds: str = ""
    last_error: str = ""
    bypass_inbound: bool = False
    enrolled_at: float = 0.0
    latency_ms: float | None = None
    steps_ms: Mapping[str, float] = field(default_factory=dict)
    check: RuleCheck | None = None

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["ips"] = list(self.ips)
        out["steps_ms"] = dict(self.steps_ms)
        out["check"] = self.check.to_json() if self.check is not None else None
        return out

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> PodRecord:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in doc.items() if k in known}
        values["ips"] = tuple(doc.get("ips") or ())
        values["steps_ms"] = dict(doc.get("steps_ms") or {})
        check = doc.get("check")
        values["check"] = RuleCheck.from_json(check) if isinstance(check, Mapping) else None
        return cls(**values)


@dataclass(frozen=True)
class InformerRecord:
    relists: int = 0
    errors: int = 0
    synced: bool = False


@dataclass(frozen=True)
class AgentState:
    """The whole state file. ``pid`` and ``written_at`` are stamped by the writer."""

    node: str
    backend: str
    dns_capture: bool = False
    ipv6: bool = True
    ready: bool = False
    ztunnel_connected: bool = False
    started_at: float = 0.0
    informers: Mapping[str, InformerRecord] = field(default_factory=dict)
    pods: tuple[PodRecord, ...] = ()
    version: int = SCHEMA_VERSION
    pid: int = 0
    written_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["informers"] = {
            name: {"relists": i.relists, "errors": i.errors, "synced": i.synced}
            for name, i in self.informers.items()
        }
        out["pods"] = [p.to_json() for p in self.pods]
        return out

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> AgentState:
        """Parse a state file's JSON; raises ValueError for another schema or a bad shape."""
        version = doc.get("version")
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"state schema version {version!r}, this command reads version "
                f"{SCHEMA_VERSION}: use the istio-cni-agent of the running agent's image"
            )
        try:
            return cls(
                node=str(doc.get("node", "")),
                backend=str(doc.get("backend", "")),
                dns_capture=bool(doc.get("dns_capture")),
                ipv6=bool(doc.get("ipv6", True)),
                ready=bool(doc.get("ready")),
                ztunnel_connected=bool(doc.get("ztunnel_connected")),
                started_at=float(doc.get("started_at") or 0.0),
                informers={
                    name: InformerRecord(**i) for name, i in (doc.get("informers") or {}).items()
                },
                pods=tuple(PodRecord.from_json(p) for p in doc.get("pods") or ()),
                pid=int(doc.get("pid") or 0),
                written_at=float(doc.get("written_at") or 0.0),
            )
        except (TypeError, AttributeError) as e:
            raise ValueError(f"malformed agent state: {e}") from None

    def writer_alive(self) -> bool:
        """Whether the process that wrote this record still runs."""
        if self.pid <= 0:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def state_path(run_dir: str) -> str:
    return os.path.join(run_dir, STATE_FILE)


def read_state(path: str) -> AgentState:
    """Load a state file; raises OSError/ValueError for the caller to explain."""
    with open(path) as f:
        doc = json.load(f)
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    return AgentState.from_json(doc)


@dataclass(frozen=True)
class StateSources:
    """Where each part of the record comes from (read at every write)."""

    node: str
    backend: str
    dns_capture: bool
    ipv6: bool
    started_at: float
    ready: Callable[[], bool]
    ztunnel_connected: Callable[[], bool]
    pods: Callable[[], Sequence[PodRecord]]
    informers: Callable[[], Mapping[str, InformerRecord]]
    before_write: Callable[[], None] = lambda: None  # e.g. mirror installer counters

    def collect(self) -> AgentState:
        self.before_write()
        return AgentState(
            node=self.node,
            backend=self.backend,
            dns_capture=self.dns_capture,
            ipv6=self.ipv6,
            ready=self.ready(),
            ztunnel_connected=self.ztunnel_connected(),
            started_at=self.started_at,
            informers=self.informers(),
            pods=tuple(self.pods()),
        )


class StateExporter:
    def __init__(self, path: str, collect: Callable[[], AgentState], interval: float = 0.5) -> None:
        self.path = path
        self.collect = collect
        self.interval = interval
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def touch(self) -> None:
        self._dirty.set()

    def write_now(self) -> None:
        doc = self.collect().to_json()
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
