"""Which pods the stand-in reaches over HBONE: istiod's answer, read from the API server.

Real ztunnel learns from istiod which workloads speak HBONE, and istiod says so for a pod
once it is annotated ``ambient.istio.io/redirection: enabled`` (set by the CNI agent after
the pod's traffic is captured and ztunnel holds it); to any other destination ztunnel
connects directly. :class:`PodDirectory` is that view for the testbed: it lists and watches
every pod through the official client and keeps ``pod IP -> Peer`` for running pods with
that annotation, so the stand-in's HBONE decision follows the annotation exactly as real
ztunnel's does (with the watch's latency standing in for istiod's push).

Without an API server (namespace-only tests) the stand-in falls back to its own proxies
(:class:`~testbed.ztunnel_standin.pod_proxy.Mesh` without a directory).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from cni_plugin import constants as c
from testbed.ztunnel_standin.identity import spiffe_id

log = logging.getLogger("testbed.ztunnel_standin")

RETRY_SECONDS = 1.0
WATCH_SECONDS = 60


@dataclass(frozen=True)
class Peer:
    """A destination reached over HBONE, with the SPIFFE id its certificate must carry."""

    name: str
    namespace: str
    identity: str


def peers_of(pod: dict[str, Any]) -> dict[str, Peer]:
    """IP -> Peer for one pod (as JSON) when istiod would call it HBONE, else empty."""
    meta = pod.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    status = pod.get("status") or {}
    if annotations.get(c.REDIRECTION_ANNOTATION) != c.REDIRECTION_ENABLED:
        return {}
    if status.get("phase") in ("Succeeded", "Failed"):
        return {}
    ips = [p.get("ip") for p in status.get("podIPs") or []] or [status.get("podIP")]
    sa = (pod.get("spec") or {}).get("serviceAccountName") or "default"
    peer = Peer(str(meta.get("name")), str(meta.get("namespace")), spiffe_id(meta["namespace"], sa))
    return {str(ip): peer for ip in ips if ip}


class PodDirectory:
    """``get(ip)``: the HBONE peer at ``ip`` or None. Fed by a list+watch thread."""

    def __init__(self, kubeconfig: str) -> None:
        self.kubeconfig = kubeconfig
        self._lock = threading.Lock()
        self._by_uid: dict[str, dict[str, Peer]] = {}
        self._by_ip: dict[str, Peer] = {}
        self._stop = threading.Event()
        self._synced = threading.Event()
        self._watch: Any = None
        self._thread = threading.Thread(target=self._run, name="directory", daemon=True)

    def start(self, sync_timeout: float = 30.0) -> None:
        """Start watching; returns once the first list is in (or after ``sync_timeout``)."""
        self._thread.start()
        if not self._synced.wait(sync_timeout):
            log.warning("pod directory not synced yet", extra={"fields": {"after_s": sync_timeout}})

    def stop(self) -> None:
        self._stop.set()
        watch = self._watch
        if watch is not None:
            watch.stop()
        self._thread.join(5)

    def get(self, ip: str) -> Peer | None:
        with self._lock:
            return self._by_ip.get(ip)

    def _put(self, uid: str, peers: dict[str, Peer]) -> None:
        with self._lock:
            if peers:
                self._by_uid[uid] = peers
            else:
                self._by_uid.pop(uid, None)
            self._by_ip = {ip: p for m in self._by_uid.values() for ip, p in m.items()}

    def _run(self) -> None:
        from kubernetes import client, config, watch

        while not self._stop.is_set():
            try:
                api_client = config.new_client_from_config(config_file=self.kubeconfig)  # type: ignore[no-untyped-call]
                api = client.CoreV1Api(api_client)
                listed = api.list_pod_for_all_namespaces(_preload_content=False)
                doc = _json(listed)
                with self._lock:
                    self._by_uid.clear()
                for pod in doc.get("items", []):
                    self._put(pod["metadata"]["uid"], peers_of(pod))
                self._synced.set()
                self._watch = watch.Watch()  # type: ignore[no-untyped-call]
                rv = doc["metadata"]["resourceVersion"]
                for event in self._watch.stream(
                    api.list_pod_for_all_namespaces,
                    resource_version=rv,
                    timeout_seconds=WATCH_SECONDS,
                ):
                    self._event(event)
                    if self._stop.is_set():
                        break
            except Exception as e:  # the API restarting, a watch expiring: list again
                if not self._stop.is_set():
                    log.info("pod directory watch ended", extra={"fields": {"error": str(e)}})
                    self._stop.wait(RETRY_SECONDS)

    def _event(self, event: dict[str, Any]) -> None:
        pod = event.get("raw_object") or {}
        uid = (pod.get("metadata") or {}).get("uid")
        if not uid:
            return
        self._put(uid, {} if event.get("type") == "DELETED" else peers_of(pod))


def _json(resp: Any) -> dict[str, Any]:
    import json

    doc: dict[str, Any] = json.loads(resp.data)
    return doc
