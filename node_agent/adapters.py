"""Adapters between the real implementations and the agent's protocols.

- :class:`KubeAccess`: what the agent needs from the API (``KubeApi`` is the real one), and
  the two list/watch views of it the informers consume (pods of this node, namespaces);
- :class:`ZdsZtunnel`: the ZDS server as enrollment's ``Ztunnel``; :class:`CacheSnapshot`:
  the pod cache as the server's snapshot source.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from node_agent.enrollment import Annotator
from node_agent.informers import WatchEvent
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
        out = []
        for e in self.cache.entries():
            if e.state not in IN_SNAPSHOT:
                continue
            info = WorkloadInfo(e.name, e.namespace, e.service_account)
            out.append(SnapshotEntry(e.uid, info, e.netns_path))
        return out


class ZdsZtunnel:
    """Adapts :class:`ZdsServer` to enrollment's ``Ztunnel``."""

    def __init__(self, server: ZdsServer) -> None:
        self.server = server

    @property
    def connected(self) -> bool:
        return self.server.connected

    def add_pod(self, pod: CachedPod, netns_path: str) -> None:
        self.server.add(
            pod.uid, netns_path, WorkloadInfo(pod.name, pod.namespace, pod.service_account)
        )

    def delete(self, uid: str) -> None:
        self.server.delete(uid)
