"""The agent's record of pods it has enrolled (or is enrolling), keyed by pod UID.

Each entry owns an open handle on the pod's network namespace (so the namespace cannot be
confused with a recycled PID's, and ztunnel can always be sent the right fd): the path
handed to others is ``/proc/<agent pid>/fd/<fd>``, valid while the entry lives. Removing
or replacing an entry closes its handle. The cache is what the ZDS snapshot is built from
and what the state file shows to ``istio-cni-agent pods``.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from enum import StrEnum

from cni_plugin.netns import Netns


class PodState(StrEnum):
    """Where a cached pod is in enrollment (SPEC §4 order)."""

    ENROLLING = "enrolling"  # being added: rules not confirmed yet
    ENABLED = "enabled"  # rules in place, ztunnel acked (or adopted at start)
    PENDING = "pending"  # rules in place, ztunnel has not taken it yet (retried)
    FAILED = "failed"  # re-applying rules failed on a pod that had them (drift repair retries)


class ZdsState(StrEnum):
    """What ztunnel knows of a cached pod."""

    UNKNOWN = "unknown"  # not sent yet
    ACKED = "acked"  # ZDS Add acknowledged
    PENDING = "pending"  # Add not delivered: goes out with the next snapshot
    KEEP = "keep"  # adopted at start without a namespace: sent as Keep{uid}
    SNAPSHOT = "snapshot"  # adopted at start with its namespace: sent in the snapshot


# States whose pods ztunnel must be told about (the ZDS snapshot carries them). ENROLLING:
# ztunnel may hold it already (its Add comes before the rules while ztunnel is connected).
IN_SNAPSHOT = frozenset({PodState.ENABLED, PodState.PENDING, PodState.ENROLLING})


@dataclass
class CachedPod:
    uid: str
    namespace: str
    name: str
    service_account: str
    ips: tuple[str, ...]
    netns: Netns | None
    state: PodState = PodState.ENROLLING
    zds: ZdsState = ZdsState.UNKNOWN
    last_error: str = ""
    backend: str = ""
    bypass_inbound: bool = False
    enrolled_at: float = 0.0
    latency_s: float = 0.0
    steps_ms: dict[str, float] = field(default_factory=dict)  # last add, per SPEC step
    annotated_at: float = 0.0  # monotonic time of our last "enabled" patch
    # The settings the rules went in with while ztunnel's ack and the rules are done and
    # only the probe set and annotation are left (None otherwise): a retry after the API
    # server failed that patch resumes there instead of doing the pod's work again.
    only_annotation_left: object | None = None
    updated: float = field(default_factory=time.time)

    @property
    def netns_inode(self) -> int | None:
        return self.netns.inode if self.netns is not None else None

    @property
    def netns_path(self) -> str | None:
        if self.netns is None or self.netns.fd < 0:
            return None
        return f"/proc/{os.getpid()}/fd/{self.netns.fd}"


class PodCache:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pods: dict[str, CachedPod] = {}

    def get(self, uid: str) -> CachedPod | None:
        with self._lock:
            return self._pods.get(uid)

    def put(self, entry: CachedPod) -> None:
        """Insert or replace; a replaced entry's namespace handle is closed unless reused."""
        with self._lock:
            old = self._pods.get(entry.uid)
            self._pods[entry.uid] = entry
        if old is not None and old.netns is not None and old.netns is not entry.netns:
            old.netns.close()

    def pop(self, uid: str) -> CachedPod | None:
        with self._lock:
            return self._pods.pop(uid, None)

    def entries(self) -> list[CachedPod]:
        with self._lock:
            return list(self._pods.values())

    def count(self, state: PodState) -> int:
        with self._lock:
            return sum(1 for p in self._pods.values() if p.state == state)

    def __len__(self) -> int:
        with self._lock:
            return len(self._pods)

    def __contains__(self, uid: object) -> bool:
        with self._lock:
            return uid in self._pods

    def close(self) -> None:
        with self._lock:
            pods, self._pods = self._pods, {}
        for p in pods.values():
            if p.netns is not None:
                p.netns.close()
