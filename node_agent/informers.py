"""Informers: keep a local copy of pods (of this node) and namespaces, and report changes.

Each :class:`Informer` lists, then watches from the list's resourceVersion; when the watch
ends, or the API server is unreachable, it resumes from the last version seen; on 410 Gone
(that version is too old) or any other failure it relists and turns the difference between
its store and the fresh list into synthetic events, so a missed delete is still delivered.
Handlers run on the informer's thread and must be quick (the agent's handlers only
enqueue). The list/watch source is a Protocol; the real one is
:class:`node_agent.kube.KubeApi`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from cni_plugin.errors import IstioCniError

log = logging.getLogger("node_agent.informers")
T = TypeVar("T")


class ResourceExpired(IstioCniError):
    """The watch's resourceVersion is too old (410 Gone): relist."""


class ApiUnavailable(IstioCniError):
    """The API server could not be reached (connection refused, reset, timed out)."""


class WatchInterrupted(ApiUnavailable):
    """The watch was ended by the agent itself (its stop shut the socket): not a failure."""


@dataclass(frozen=True)
class WatchEvent:
    type: str  # ADDED, MODIFIED, DELETED, BOOKMARK
    obj: dict[str, Any]


class ListWatch(Protocol):
    def list(self) -> tuple[list[dict[str, Any]], str]: ...

    def watch(self, resource_version: str, timeout_seconds: int) -> Iterator[WatchEvent]: ...


# handler(old, new): old None = added, new None = deleted.
Handler = Callable[[Any, Any], None]


class Informer(Generic[T]):
    """A list+watch loop over one resource kind with a local store keyed by ``key``."""

    def __init__(
        self,
        name: str,
        source: ListWatch,
        parse: Callable[[dict[str, Any]], T],
        key: Callable[[T], str],
        handler: Callable[[T | None, T | None], None],
        *,
        watch_timeout: int = 240,
        retry_delay: float = 1.0,
        interrupt: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self._source = source
        self._parse = parse
        self._key = key
        self._handler = handler
        self._watch_timeout = watch_timeout
        self._retry_delay = retry_delay
        self._interrupt = interrupt
        self._store: dict[str, T] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.synced = threading.Event()
        self.resource_version = ""
        self.relists = 0
        self.errors = 0

    # -- store ---------------------------------------------------------------------------
    def get(self, key: str) -> T | None:
        with self._lock:
            return self._store.get(key)

    def items(self) -> list[T]:
        with self._lock:
            return list(self._store.values())

    # -- loop ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"informer:{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ends the loop. A watch blocks in a socket read until its next event: ``interrupt``
        (the source's, e.g. :meth:`node_agent.kube.KubeApi.interrupt_watches`) wakes it, so
        the join ends at once; without one the join is bounded (daemon thread)."""
        self._stop.set()
        if self._interrupt is not None:
            self._interrupt()
        if self._thread is not None:
            self._thread.join(timeout=0.5)

    def _run(self) -> None:
        need_list = True
        failures = 0
        while not self._stop.is_set():
            try:
                if need_list:
                    self.relist()
                    need_list = False
                self.watch_once()
                failures = 0
            except Exception as e:
                if self._stop.is_set():
                    return  # woken by stop() (the watch's socket shut): not a failure
                failures += 0 if isinstance(e, ResourceExpired) else 1
                need_list = self._failed(e, failures) or need_list

    def _failed(self, e: Exception, failures: int) -> bool:
        """Log a failed list/watch and wait before the next try; True: relist."""
        if isinstance(e, WatchInterrupted):  # another informer's stop came first: ours is next
            log.debug("watch ended by the agent's stop", extra={"fields": {"informer": self.name}})
            self._stop.wait(min(self._retry_delay * failures, 5.0))
            return False
        if isinstance(e, ResourceExpired):
            log.info(
                "watch expired, relisting",
                extra={"fields": {"informer": self.name, "reason": str(e)}},
            )
            return True
        self.errors += 1
        if isinstance(e, ApiUnavailable):
            # As client-go's reflector: the server is most likely restarting; relisting
            # everything would not help, so resume the watch from the last version seen
            # once it answers (if that version is gone by then, it says 410: relist).
            log.warning(
                "api server unreachable, will resume the watch",
                extra={"fields": {"informer": self.name, "error": str(e)}},
            )
            relist = False
        else:
            log.warning(
                "list/watch failed, relisting",
                extra={"fields": {"informer": self.name, "error": str(e)}},
            )
            relist = True  # unknown failure: we cannot know what was missed
        self._stop.wait(min(self._retry_delay * failures, 5.0))
        return relist

    def relist(self) -> None:
        """List everything and deliver the difference with the store as events."""
        raw, rv = self._source.list()
        fresh: dict[str, T] = {}
        for obj in raw:
            item = self._parse(obj)
            fresh[self._key(item)] = item
        with self._lock:
            old = self._store
            self._store = fresh
            self.resource_version = rv
        self.relists += 1
        for k, item in fresh.items():
            prev = old.get(k)
            if prev != item:
                self._handler(prev, item)
        for k, prev in old.items():
            if k not in fresh:
                self._handler(prev, None)
        self.synced.set()

    def watch_once(self) -> None:
        """One watch request from the current resourceVersion until it ends."""
        for ev in self._source.watch(self.resource_version, self._watch_timeout):
            if self._stop.is_set():
                return
            meta = ev.obj.get("metadata") or {}
            rv = meta.get("resourceVersion")
            if ev.type == "BOOKMARK":
                if rv:
                    self.resource_version = rv
                continue
            item = self._parse(ev.obj)
            k = self._key(item)
            with self._lock:
                prev = self._store.get(k)
                if ev.type == "DELETED":
                    self._store.pop(k, None)
                else:
                    self._store[k] = item
                if rv:
                    self.resource_version = rv
            if ev.type == "DELETED":
                self._handler(prev if prev is not None else item, None)
            elif prev != item:
                self._handler(prev, item)
