"""Fakes for the node agent's edges that cannot be staged in a unit test: an in-memory
Kubernetes API (list/watch with resourceVersions, 410 on demand, merge-patch of the
redirection annotation), a rules backend, ztunnel and the probe set that record calls, a
netns finder over a made-up /proc and an opener (every namespace is this process's own:
creating one needs root), an informer store, and a work queue that records what it was
asked. The real ones are exercised by the netns and testbed tests."""

from __future__ import annotations

import copy
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from cni_plugin import constants as c
from cni_plugin.enablement import bypass_inbound
from cni_plugin.errors import (
    NetnsError,
    RedirectionError,
    ZtunnelRejectedError,
    ZtunnelUnavailableError,
)
from cni_plugin.netns import Netns, NetnsId
from cni_plugin.redirection.backend import CheckReport
from cni_plugin.redirection.settings import RedirectSettings
from node_agent.enrollment import Enroller
from node_agent.informers import ApiUnavailable, ResourceExpired, WatchEvent
from node_agent.netns_finder import FoundNetns
from node_agent.pod_cache import CachedPod, PodCache
from node_agent.resources import PodInfo
from tests.time_scale import scaled


def make_pod(
    namespace: str,
    name: str,
    *,
    node: str = "node-1",
    ip: str | None = "10.0.0.1",
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    host_network: bool = False,
    phase: str = "Running",
    uid: str | None = None,
) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase}
    if ip:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": uid or str(uuid.uuid4()),
            "labels": labels or {},
            "annotations": annotations or {},
        },
        "spec": {"nodeName": node, "hostNetwork": host_network, "serviceAccountName": "sa"},
        "status": status,
    }


class _Stream:
    def __init__(self) -> None:
        self.q: queue.Queue[WatchEvent | None] = queue.Queue()


class FakeKube:
    """In-memory API server for one node's pods and all namespaces."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.rv = 1
        self.pods: dict[str, dict[str, Any]] = {}  # uid -> pod
        self.namespaces: dict[str, dict[str, Any]] = {}
        self._pod_streams: list[_Stream] = []
        self._ns_streams: list[_Stream] = []
        self.expire_next_watch = False
        self.patches: list[tuple[str, str, str | None]] = []
        self.fail_lists = 0
        self.fail_watches = 0
        self._history: dict[int, list[tuple[int, WatchEvent]]] = {}

    def _bump(self, obj: dict[str, Any]) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)

    def _emit(self, streams: list[_Stream], kind: str, obj: dict[str, Any]) -> None:
        ev = WatchEvent(kind, copy.deepcopy(obj))
        # History per stream list, so a watch from an older resourceVersion replays what it
        # missed (as the API server's watch cache does).
        self._history.setdefault(id(streams), []).append((self.rv, ev))
        for s in streams:
            s.q.put(WatchEvent(kind, copy.deepcopy(obj)))

    # -- test controls ----------------------------------------------------------------
    def put_namespace(self, name: str, labels: dict[str, str] | None = None) -> None:
        with self._lock:
            kind = "MODIFIED" if name in self.namespaces else "ADDED"
            obj = {"metadata": {"name": name, "labels": labels or {}}}
            self._bump(obj)
            self.namespaces[name] = obj
            self._emit(self._ns_streams, kind, obj)

    def put_pod(self, pod: dict[str, Any]) -> str:
        with self._lock:
            uid = pod["metadata"]["uid"]
            kind = "MODIFIED" if uid in self.pods else "ADDED"
            self._bump(pod)
            self.pods[uid] = pod
            self._emit(self._pod_streams, kind, pod)
            return str(uid)

    def delete_pod(self, uid: str) -> None:
        with self._lock:
            pod = self.pods.pop(uid)
            self._bump(pod)
            self._emit(self._pod_streams, "DELETED", pod)

    def compact(self) -> None:
        """Forget the pod events already delivered and the patches recorded, as the API
        server's compaction does (a long soak must not grow its fake API). Call it only
        when every watcher has seen every event (a later watch from an older version would
        miss them)."""
        with self._lock:
            self._history.pop(id(self._pod_streams), None)
            self.patches.clear()

    def drop_watches(self) -> None:
        """End every open watch (like an API server restart)."""
        with self._lock:
            for s in self._pod_streams + self._ns_streams:
                s.q.put(None)

    def pod(self, uid: str) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self.pods[uid])

    def annotation(self, uid: str) -> str | None:
        with self._lock:
            ann = self.pods[uid]["metadata"].get("annotations") or {}
            return ann.get(c.REDIRECTION_ANNOTATION)

    # -- KubeAccess ---------------------------------------------------------------------
    def list_pods(self, node_name: str) -> tuple[list[dict[str, Any]], str]:
        with self._lock:
            if self.fail_lists:
                self.fail_lists -= 1
                raise ConnectionError("fake API server down")
            items = [
                copy.deepcopy(p) for p in self.pods.values() if p["spec"]["nodeName"] == node_name
            ]
            return items, str(self.rv)

    def list_namespaces(self) -> tuple[list[dict[str, Any]], str]:
        with self._lock:
            return [copy.deepcopy(n) for n in self.namespaces.values()], str(self.rv)

    def _watch(
        self, streams: list[_Stream], timeout_seconds: int, resource_version: str = ""
    ) -> Iterator[WatchEvent]:
        with self._lock:
            # 410 is injected into the pods watch only (the namespaces watch would race
            # for the flag otherwise).
            if self.expire_next_watch and streams is self._pod_streams:
                self.expire_next_watch = False
                raise ResourceExpired("fake 410")
            if self.fail_watches:
                self.fail_watches -= 1
                raise ApiUnavailable("fake watch connection refused")
            s = _Stream()
            streams.append(s)
            since = int(resource_version) if resource_version.isdigit() else self.rv
            for rv, old in self._history.get(id(streams), []):
                if rv > since:
                    s.q.put(WatchEvent(old.type, copy.deepcopy(old.obj)))
        deadline = time.monotonic() + min(timeout_seconds, 2)
        try:
            while time.monotonic() < deadline:
                try:
                    ev = s.q.get(timeout=0.05)
                except queue.Empty:
                    continue
                if ev is None:
                    return
                yield ev
        finally:
            with self._lock:
                streams.remove(s)

    def watch_pods(
        self, node_name: str, resource_version: str, timeout_seconds: int
    ) -> Iterator[WatchEvent]:
        for ev in self._watch(self._pod_streams, timeout_seconds, resource_version):
            if ev.obj["spec"]["nodeName"] == node_name:
                yield ev

    def watch_namespaces(self, resource_version: str, timeout_seconds: int) -> Iterator[WatchEvent]:
        return self._watch(self._ns_streams, timeout_seconds, resource_version)

    def interrupt_watches(self) -> None:
        self.drop_watches()

    def get_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            for p in self.pods.values():
                if p["metadata"]["namespace"] == namespace and p["metadata"]["name"] == name:
                    return copy.deepcopy(p)
        return None

    def patch_redirection(self, namespace: str, name: str, value: str | None) -> bool:
        self.patches.append((namespace, name, value))
        with self._lock:
            for p in self.pods.values():
                if p["metadata"]["namespace"] == namespace and p["metadata"]["name"] == name:
                    ann = p["metadata"].setdefault("annotations", {})
                    if value is None:
                        ann.pop(c.REDIRECTION_ANNOTATION, None)
                    else:
                        ann[c.REDIRECTION_ANNOTATION] = value
                    self._bump(p)
                    self._emit(self._pod_streams, "MODIFIED", p)
                    return True
        return False


class FakeRules:
    name = "fake"

    def __init__(self, order: list[str] | None = None) -> None:
        self.installed: dict[str, RedirectSettings] = {}  # netns inode (str) -> settings
        self.fail = False
        self.calls: list[tuple[str, str]] = []
        self.order = order if order is not None else []

    @staticmethod
    def _key(path: str) -> str:
        return str(os.stat(path).st_ino)

    def apply(self, netns_path: str, settings: RedirectSettings) -> None:
        self.calls.append(("apply", netns_path))
        self.order.append("rules")
        if self.fail:
            raise RedirectionError("fake rule failure")
        self.installed[self._key(netns_path)] = settings

    def remove(self, netns_path: str, settings: RedirectSettings) -> None:
        self.calls.append(("remove", netns_path))
        self.order.append("rules-remove")
        self.installed.pop(self._key(netns_path), None)

    def check(self, netns_path: str, settings: RedirectSettings) -> CheckReport:
        ok = self.installed.get(self._key(netns_path)) == settings
        return CheckReport() if ok else CheckReport(missing=("all rules",))

    def render(self, settings: RedirectSettings) -> str:
        return "fake rules"


class FakeZtunnel:
    def __init__(self, connected: bool = True, order: list[str] | None = None) -> None:
        self._connected = connected
        self.order = order if order is not None else []
        self.adds: list[tuple[str, int]] = []  # uid, netns inode
        self.dels: list[str] = []
        self.reject = False  # connected, but ztunnel nacks Adds

    @property
    def connected(self) -> bool:
        return self._connected

    def set_connected(self, v: bool) -> None:
        self._connected = v

    def add_pod(self, pod: CachedPod, netns_path: str) -> None:
        self.order.append("zds-add")
        if not self._connected:
            raise ZtunnelUnavailableError("fake: no ztunnel")
        if self.reject:
            raise ZtunnelRejectedError("fake: failure to start proxy")
        self.adds.append((pod.uid, os.stat(netns_path).st_ino))

    def delete(self, uid: str) -> None:
        self.order.append("zds-del")
        self.dels.append(uid)

    def delete_later(self, uid: str, delay: float) -> None:
        self.order.append(f"zds-del-after:{delay:g}")
        self.dels.append(uid)


class FakeProbes:
    def __init__(self, order: list[str] | None = None) -> None:
        self.members: dict[str, str] = {}
        self.order = order if order is not None else []

    def add(self, uid: str, ips: tuple[str, ...]) -> None:
        self.order.append("probe-add")
        for ip in ips:
            self.members[ip] = uid

    def remove(self, uid: str, ips: tuple[str, ...]) -> None:
        self.order.append("probe-remove")
        for ip in ips:
            self.members.pop(ip, None)


T = TypeVar("T")
OWN_NETNS = "/proc/self/ns/net"


class DictStore(Generic[T]):
    """An informer's store, filled by the test."""

    def __init__(self, key: Callable[[T], str]) -> None:
        self.key = key
        self.objects: dict[str, T] = {}

    def put(self, obj: T) -> T:
        self.objects[self.key(obj)] = obj
        return obj

    def drop(self, key: str) -> None:
        self.objects.pop(key, None)

    def get(self, key: str) -> T | None:
        return self.objects.get(key)

    def items(self) -> list[T]:
        return list(self.objects.values())


def own_netns_id() -> NetnsId:
    st = os.stat(OWN_NETNS)
    return NetnsId(st.st_dev, st.st_ino)


class FakeFinder:
    """Pods' namespaces as a /proc walk would find them; ``replaced`` ones report another
    inode than the namespace the agent holds (the sandbox was re-created)."""

    proc_root = "/fake/proc"

    def __init__(self) -> None:
        self.found: dict[str, FoundNetns] = {}
        self.scans = 0

    def show(self, uid: str, *, replaced: bool = False) -> None:
        ident = own_netns_id()
        if replaced:
            ident = NetnsId(ident.dev, ident.inode + 1)
        self.found[uid] = FoundNetns(uid, 4242, OWN_NETNS, ident, 1)

    def hide(self, uid: str) -> None:
        self.found.pop(uid, None)

    def find(self, uid: str) -> FoundNetns | None:
        return self.found.get(uid)

    def scan(self, wanted: set[str] | None = None) -> dict[str, FoundNetns]:
        self.scans += 1
        return {u: f for u, f in self.found.items() if wanted is None or u in wanted}


class FakeOpener:
    """Opens this process's own namespace whatever the path (host check off); paths in
    ``gone`` fail as a vanished namespace does."""

    def __init__(self) -> None:
        self.opened: list[str] = []
        self.gone: set[str] = set()

    def open(self, path: str) -> Netns:
        self.opened.append(path)
        if path in self.gone:
            raise NetnsError(f"{path}: no such network namespace")
        return Netns.open(OWN_NETNS, host_netns=None)


class RecordingQueue:
    """The controller's work queue: records keys added (now and later) and forgotten;
    ``run_exclusive`` runs the work at once."""

    def __init__(self) -> None:
        self.added: list[str] = []
        self.later: list[tuple[str, float]] = []
        self.forgotten: list[str] = []
        self.exclusive: list[str] = []

    def add(self, key: str) -> None:
        self.added.append(key)

    def add_after(self, key: str, delay: float) -> None:
        self.later.append((key, delay))

    def forget(self, key: str) -> None:
        self.forgotten.append(key)

    def run_exclusive(self, key: str, work: Callable[[], T]) -> T:
        self.exclusive.append(key)
        return work()


class AgentEdges:
    """Every fake edge of the agent's decision core, with the real Enroller and PodCache
    over them: what the PodController and Reconciler unit tests build on."""

    def __init__(self, *, zt_connected: bool = True) -> None:
        self.kube = FakeKube()
        self.rules = FakeRules()
        self.zt = FakeZtunnel(zt_connected)
        self.probes = FakeProbes()
        self.cache = PodCache()
        self.pods: DictStore[PodInfo] = DictStore(lambda p: p.uid)
        self.finder = FakeFinder()
        self.opener = FakeOpener()
        self.queue = RecordingQueue()
        self.enroller = Enroller(
            self.rules,
            self.zt,
            self.probes,
            self.kube,
            self.cache,
            lambda p: RedirectSettings(bypass_inbound=bypass_inbound(p.annotations)),
        )

    def pod(self, ns: str, name: str, *, found: bool = True, **kw: Any) -> PodInfo:
        """A pod in the API and the informer's store, its sandbox visible in /proc."""
        raw = make_pod(ns, name, **kw)
        self.kube.put_pod(raw)
        pod = self.pods.put(PodInfo.from_json(raw))
        if found:
            self.finder.show(pod.uid)
        return pod


def wait_for(cond: Any, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + scaled(timeout)
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")
