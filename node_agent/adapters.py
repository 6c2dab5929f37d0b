"""Adapters between the real implementations and the agent's protocols.

- :class:`KubeAccess`: what the agent needs from the API (``KubeApi`` is the real one), and
  the two list/watch views of it the informers consume (pods of this node, namespaces);
- :class:`SerialRules`: a redirection backend whose library is not thread-safe, behind a lock;
- :class:`ZdsZtunnel`: the ZDS server as enrollment's ``Ztunnel``, and the pod cache as the
  server's snapshot source.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any, Protocol

from cni_plugin.errors import ZtunnelUnavailableError
from cni_plugin.redirection.backend import CheckReport
from cni_plugin.redirection.settings import RedirectSettings
from node_agent.enrollment import Annotator, Rules
from node_agent.informers import WatchEvent
from node_agent.pod_cache import CachedPod, PodCache
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


# Backends the agent calls one at a time (see SerialRules for why ebpf still is).
SERIAL_BACKENDS = ("ebpf",)


class SerialRules:
    """A backend behind one lock: one apply/remove/check at a time.

    Kept for the ebpf backend, on purpose, after the backend learnt to lock itself:
    - the original crash (two bcc compiles at once corrupt libbcc's heap: SIGSEGV/SIGABRT)
      is now prevented inside the backend (``image.load_image`` and the variant loading take
      a lock, commit fc27673). ``tests/netns/test_bpf_concurrency.py`` shows it for real: 3
      cold processes x 8 threads released together x 6 rounds of apply/check/remove/apply
      across two settings variants, no error; the same stress without the image lock
      crashed 3 runs out of 3 (rc 139, 139, 134);
    - but one path is not safe to overlap: when the node-wide pins (NAT map, getsockopt
      link) have been removed behind the agent's back, the next ``apply`` closes every
      cached variant's program fds and loads new ones, while another thread may be
      attaching with the old fds (closed, possibly reused numbers). Serialising the calls
      excludes that;
    - the cost is small: an ebpf apply is a few milliseconds of netlink and pinning (no
      subprocess), so one at a time still enrols hundreds of pods per second.
    Pin pruning (``node_agent.bpf_pins``) runs outside this lock: it only deletes pins of
    namespaces that are gone, and only pins listed before the live namespaces were.
    """

    def __init__(self, inner: Rules) -> None:
        self.inner = inner
        self.name = inner.name
        self._lock = threading.Lock()

    def apply(self, netns_path: str, settings: RedirectSettings) -> None:
        with self._lock:
            self.inner.apply(netns_path, settings)

    def remove(self, netns_path: str, settings: RedirectSettings) -> None:
        with self._lock:
            self.inner.remove(netns_path, settings)

    def check(self, netns_path: str, settings: RedirectSettings) -> CheckReport:
        with self._lock:
            return self.inner.check(netns_path, settings)


class ZdsZtunnel:
    """Adapts :class:`ZdsServer` to enrollment's ``Ztunnel`` and the cache to its snapshot.

    ``delete_later`` sends the Del from a timer thread; an Add or Del of the same pod before
    it fires replaces it, and one being sent when an Add comes is sent first (so ztunnel
    never sees a stale Del after the Add that re-enrolled the pod). A timer firing after the
    server stopped finds no connection: nothing is sent (the next ztunnel's snapshot, which
    lacks the pod, drops it)."""

    def __init__(self, cache: PodCache) -> None:
        self.cache = cache
        self.server: ZdsServer | None = None
        self._lock = threading.Lock()
        self._sending = threading.Lock()  # held while a deferred Del is on the wire
        self._timers: dict[str, threading.Timer] = {}

    @property
    def connected(self) -> bool:
        return self.server is not None and self.server.connected

    def add_pod(self, pod: CachedPod, netns_path: str) -> None:
        self._cancel(pod.uid)
        if self.server is None:
            raise ZtunnelUnavailableError("the ZDS server is not started yet; will retry")
        self.server.add(
            pod.uid, netns_path, WorkloadInfo(pod.name, pod.namespace, pod.service_account)
        )

    def delete(self, uid: str) -> None:
        self._cancel(uid)
        if self.server is not None:
            self.server.delete(uid)

    def delete_later(self, uid: str, delay: float) -> None:
        timer = threading.Timer(delay, self._deferred, args=(uid,))
        timer.daemon = True
        with self._lock:
            old = self._timers.pop(uid, None)
            self._timers[uid] = timer
        if old is not None:
            old.cancel()
        timer.start()

    def _cancel(self, uid: str) -> None:
        with self._lock:
            timer = self._timers.pop(uid, None)
        if timer is not None:
            timer.cancel()
        with self._sending:  # a deferred Del already on its way goes first
            pass

    def _deferred(self, uid: str) -> None:
        with self._sending:
            with self._lock:
                if self._timers.get(uid) is not threading.current_thread():
                    return  # replaced or cancelled meanwhile
                del self._timers[uid]
            if self.server is not None:
                self.server.delete(uid)

    def snapshot(self) -> list[SnapshotEntry]:
        out = []
        for e in self.cache.entries():
            # "enrolling": ztunnel may already hold it (Add comes before the rules).
            if e.state not in ("enabled", "pending", "enrolling"):
                continue
            info = WorkloadInfo(e.name, e.namespace, e.service_account)
            out.append(SnapshotEntry(e.uid, info, e.netns_path))
        return out
