"""Adapters between the real implementations and the agent's protocols.

- :class:`KubeAccess`: what the agent needs from the API (``KubeApi`` is the real one), and
  the two list/watch views of it the informers consume (pods of this node, namespaces);
- :class:`ZdsZtunnel`: the ZDS server as enrollment's ``Ztunnel``; :class:`CacheSnapshot`:
  the pod cache as the server's snapshot source.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any, Protocol

from cni_plugin.errors import NetnsError
from node_agent.enrollment import Annotator
from node_agent.informers import WatchEvent
from node_agent.keyed_timers import KeyedTimers
from node_agent.pod_cache import IN_SNAPSHOT, CachedPod, PodCache
from node_agent.zds_server import SnapshotEntry, WorkloadInfo, ZdsServer


class KubeAccess(Annotator, Protocol):
    """What the agent needs from the API (the real one is :class:`node_agent.kube.KubeApi`)."""

    def list_pods(self, node_name: str) -> tuple[list[dict[str, Any]], str]: ...

    def watch_pods(
        self, node_name: str, resource_version: str, timeout_seconds: int
    ) -> Iterator[WatchEvent]: ...

    def list_namespaces(self) -> tuple[list[dict[str, Any]], str]: ...

    def watch_namespaces(
        self, resource_version: str, timeout_seconds: int
    ) -> Iterator[WatchEvent]: ...

    def get_pod(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def interrupt_watches(self) -> None:
        """End the watches in flight now (at stop: a watch blocks in a read otherwise)."""


class PodsListWatch:
    def __init__(self, kube: KubeAccess, node: str) -> None:
        self.kube, self.node = kube, node

    def list(self) -> tuple[list[dict[str, Any]], str]:
        return self.kube.list_pods(self.node)

    def watch(self, resource_version: str, timeout_seconds: int) -> Iterator[WatchEvent]:
        return self.kube.watch_pods(self.node, resource_version, timeout_seconds)


class NamespacesListWatch:
    def __init__(self, kube: KubeAccess) -> None:
        self.kube = kube

    def list(self) -> tuple[list[dict[str, Any]], str]:
        return self.kube.list_namespaces()

    def watch(self, resource_version: str, timeout_seconds: int) -> Iterator[WatchEvent]:
        return self.kube.watch_namespaces(resource_version, timeout_seconds)


class CacheSnapshot:
    """The pod cache as the ZDS server's snapshot source: the pods ztunnel must know."""

    def __init__(self, cache: PodCache) -> None:
        self.cache = cache

    def snapshot(self) -> list[SnapshotEntry]:
        """Each pod with its own duplicate of the cache's namespace handle (the snapshot
        owns it): sent one ack at a time, the snapshot must not depend on cache fds that a
        removal may close and an enrolment reuse meanwhile."""
        out = []
        for e in self.cache.entries():
            if e.state not in IN_SNAPSHOT:
                continue
            netns = None
            if e.netns is not None:
                try:
                    netns = e.netns.dup()
                except NetnsError:
                    continue  # removed since entries() was read: not in the snapshot
            info = WorkloadInfo(e.name, e.namespace, e.service_account)
            out.append(SnapshotEntry(e.uid, info, netns))
        return out


class ZdsZtunnel:
    """Adapts :class:`ZdsServer` to enrollment's ``Ztunnel``.

    ``delete_later`` sends the Del from a timer thread; an Add or Del of the same pod before
    it fires replaces it, and one being sent when an Add comes is sent first (so ztunnel
    never sees a stale Del after the Add that re-enrolled the pod). A timer firing after the
    server stopped finds no connection: nothing is sent (the next ztunnel's snapshot, which
    lacks the pod, drops it)."""

    def __init__(self, server: ZdsServer) -> None:
        self.server = server
        # The guard is held while a deferred Del is on the wire: an Add cancelling it waits.
        self._deferred = KeyedTimers(guard=threading.Lock())

    @property
    def connected(self) -> bool:
        return self.server.connected

    def add_pod(self, pod: CachedPod, netns_path: str) -> None:
        self._deferred.cancel(pod.uid)
        info = WorkloadInfo(pod.name, pod.namespace, pod.service_account)
        if pod.netns is not None:
            # The cached handle itself (duplicated: the server closes its copy), not a path
            # through /proc/<pid>/fd that could name a recycled fd number.
            self.server.add_netns(pod.uid, pod.netns.dup(), info)
        else:
            self.server.add(pod.uid, netns_path, info)

    def delete(self, uid: str) -> None:
        self._deferred.cancel(uid)
        self.server.delete(uid)

    def delete_later(self, uid: str, delay: float) -> None:
        self._deferred.schedule(uid, delay, lambda: self.server.delete(uid))
