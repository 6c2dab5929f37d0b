"""Fakes for the node agent's edges that cannot be staged in a unit test: an in-memory
Kubernetes API (list/watch with resourceVersions, 410 on demand, merge-patch of the
redirection annotation), a rules backend, ztunnel and the probe set that record calls.
The real ones are exercised by the netns and testbed tests."""

from __future__ import annotations

import copy
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from cni_plugin import constants as c
from cni_plugin.errors import RedirectionError, ZtunnelRejectedError, ZtunnelUnavailableError
from cni_plugin.redirection.backend import CheckReport
from cni_plugin.redirection.settings import RedirectSettings
from node_agent.informers import ApiUnavailable, ResourceExpired, WatchEvent
from node_agent.pod_cache import CachedPod
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
        import os

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
        import os

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


def wait_for(cond: Any, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + scaled(timeout)
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")
