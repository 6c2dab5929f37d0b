"""The Kubernetes API edge: the ONLY agent module that imports the official ``kubernetes`` client.

It lists and watches pods of one node (field selector ``spec.nodeName``) and all
namespaces, reads one pod, and merge-patches the redirection annotation on
``pods/status``. Requests go through the client's ``ApiClient`` (its configuration, auth,
TLS and connection pool) with the paths of the six calls written here, not through the
generated ``CoreV1Api``: importing that class builds its typed signatures and the ~200 pod
and namespace models they name, about 22 MB of the agent's resident set and seconds of its
start (measured, docs/benchmarks.md), for calls whose responses are never deserialized.
Responses are read as raw JSON and handed on as dicts; :mod:`node_agent.resources` parses
them. A watch that the server answers with 410 Gone raises
:class:`~node_agent.informers.ResourceExpired`, so the informer relists.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import urllib3
from kubernetes import config
from kubernetes.client.api_client import ApiClient
from kubernetes.client.configuration import Configuration
from kubernetes.watch import watch as _watch_mod

from cni_plugin import constants as c
from cni_plugin.errors import ConfigError, IstioCniError
from node_agent.informers import ApiUnavailable, ResourceExpired, WatchEvent, WatchInterrupted

MERGE_PATCH = "application/merge-patch+json"
POOL_SIZE = 32
Query = tuple[tuple[str, Any], ...]


class KubeError(IstioCniError):
    """The API server answered with an error (or could not be reached)."""


def _check(resp: Any, what: str) -> None:
    status = int(getattr(resp, "status", 0))
    if status == 410:
        raise ResourceExpired(f"{what}: resource version too old (410 Gone)")
    if status >= 300:
        body = resp.data.decode(errors="replace") if getattr(resp, "data", None) else ""
        raise KubeError(f"{what}: API server answered {status}: {body[:300]}")


class KubeApi:
    """List/watch/get/patch through the ``kubernetes`` client and a kubeconfig
    (or the in-cluster ServiceAccount when no kubeconfig is given)."""

    def __init__(self, kubeconfig: str = "", *, request_timeout: float = 10.0) -> None:
        cfg = Configuration()
        loader: Any = config
        try:
            if kubeconfig:
                loader.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
            else:
                loader.load_incluster_config(client_configuration=cfg)
        except Exception as e:  # the client raises several unrelated types here
            where = kubeconfig or "the in-cluster ServiceAccount"
            raise ConfigError(
                f"cannot load Kubernetes credentials from {where}: {e}; pass --kubeconfig "
                "or set KUBECONFIG to a readable kubeconfig"
            ) from None
        # One pooled connection per concurrent caller (the enrolment workers' patches, the
        # two watches, plugin reads): the default (5 per core) made urllib3 discard
        # connections under a 16-worker burst, each one a new TLS handshake.
        cfg.connection_pool_maxsize = max(int(cfg.connection_pool_maxsize or 0), POOL_SIZE)
        self._api: Any = ApiClient(cfg)
        self._timeout = request_timeout
        self._watches_lock = threading.Lock()
        self._watches: set[Any] = set()
        self._interrupted = False

    def close(self) -> None:
        self.interrupt_watches()
        self._api.close()

    def interrupt_watches(self) -> None:
        """End every watch in flight now and refuse new ones: their sockets are shut down,
        which wakes a read blocked on them (the informers' stop does not wait out a read)."""
        with self._watches_lock:
            self._interrupted = True
            watches = list(self._watches)
        for resp in watches:
            with contextlib.suppress(Exception):  # already closed: nothing to wake
                resp.shutdown()

    def _request(
        self,
        method: str,
        path: str,
        query: Query = (),
        body: object = None,
        *,
        content_type: str = "",
        timeout: Any = None,
    ) -> Any:
        """One request through the client (auth, TLS, pool); the urllib3 response, its body
        not read yet, whatever its status (the caller decides)."""
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        req = self._api.param_serialize(
            method=method,
            resource_path=path,
            query_params=list(query),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        rest = self._api.call_api(*req, _request_timeout=timeout or self._timeout)
        return rest.response

    def _read(self, resp: Any, what: str) -> dict[str, Any]:
        try:
            _check(resp, what)
            out: dict[str, Any] = json.loads(resp.data)
            return out
        finally:
            resp.release_conn()

    # -- pods ---------------------------------------------------------------------------
    def list_pods(self, node_name: str) -> tuple[list[dict[str, Any]], str]:
        try:
            resp = self._request(
                "GET", "/api/v1/pods", (("fieldSelector", f"spec.nodeName={node_name}"),)
            )
        except Exception as e:
            raise KubeError(f"cannot list pods: {e}") from None
        body = self._read(resp, "list pods")
        return list(body.get("items") or []), body["metadata"].get("resourceVersion", "")

    def watch_pods(
        self, node_name: str, resource_version: str, timeout_seconds: int
    ) -> Iterator[WatchEvent]:
        return self._watch(
            "/api/v1/pods",
            "watch pods",
            resource_version,
            timeout_seconds,
            (("fieldSelector", f"spec.nodeName={node_name}"),),
        )

    def get_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            resp = self._request("GET", _pod_path(namespace, name))
        except Exception as e:
            raise KubeError(f"cannot read pod {namespace}/{name}: {e}") from None
        if int(resp.status) == 404:
            resp.release_conn()
            return None
        return self._read(resp, f"read pod {namespace}/{name}")

    def patch_redirection(self, namespace: str, name: str, value: str | None) -> bool:
        """Merge-patch the redirection annotation on pods/status; False when the pod is gone."""
        body = {"metadata": {"annotations": {c.REDIRECTION_ANNOTATION: value}}}
        try:
            resp = self._request(
                "PATCH", _pod_path(namespace, name) + "/status", body=body, content_type=MERGE_PATCH
            )
        except Exception as e:
            raise KubeError(f"cannot annotate pod {namespace}/{name}: {e}") from None
        if int(resp.status) == 404:
            resp.release_conn()
            return False
        self._read(resp, f"annotate pod {namespace}/{name}")
        return True

    # -- namespaces ----------------------------------------------------------------------
    def list_namespaces(self) -> tuple[list[dict[str, Any]], str]:
        try:
            resp = self._request("GET", "/api/v1/namespaces")
        except Exception as e:
            raise KubeError(f"cannot list namespaces: {e}") from None
        body = self._read(resp, "list namespaces")
        return list(body.get("items") or []), body["metadata"].get("resourceVersion", "")

    def watch_namespaces(self, resource_version: str, timeout_seconds: int) -> Iterator[WatchEvent]:
        return self._watch(
            "/api/v1/namespaces", "watch namespaces", resource_version, timeout_seconds
        )

    # -- shared --------------------------------------------------------------------------
    def _watch(
        self, path: str, what: str, resource_version: str, timeout_seconds: int, query: Query = ()
    ) -> Iterator[WatchEvent]:
        params: Query = (
            *query,
            ("watch", True),
            ("resourceVersion", resource_version),
            ("timeoutSeconds", timeout_seconds),
            ("allowWatchBookmarks", True),
        )
        try:
            # Read deadline past the server-side timeout: a silent dead connection
            # (API server killed) ends the watch instead of hanging forever.
            resp = self._request("GET", path, params, timeout=(self._timeout, timeout_seconds + 15))
        except urllib3.exceptions.HTTPError as e:  # refused, reset, timed out
            raise ApiUnavailable(f"cannot {what}: {e}") from None
        except Exception as e:
            raise KubeError(f"cannot {what}: {e}") from None
        with self._watches_lock:
            interrupted = self._interrupted
            self._watches.add(resp)
        try:
            if interrupted:
                raise WatchInterrupted(f"{what}: the agent is stopping")
            _check(resp, what)
            lines: Iterator[str] = _iter_lines(resp)
            for line in lines:
                if not line:
                    continue
                event = json.loads(line)
                kind = event.get("type", "")
                obj = event.get("object") or {}
                if kind == "ERROR":
                    if int(obj.get("code", 0)) == 410:
                        raise ResourceExpired(f"{what}: {obj.get('message', '410 Gone')}")
                    raise KubeError(f"{what}: watch error {obj.get('message', obj)}")
                yield WatchEvent(kind, obj)
        except (ResourceExpired, KubeError, ApiUnavailable):  # WatchInterrupted among them
            raise
        except urllib3.exceptions.HTTPError as e:
            if self._interrupted:
                raise WatchInterrupted(f"{what} ended: the agent is stopping") from None
            raise ApiUnavailable(f"{what} interrupted: {e}") from None
        except Exception as e:
            raise KubeError(f"{what} interrupted: {e}") from None
        finally:
            with self._watches_lock:
                self._watches.discard(resp)
            resp.release_conn()


# The client's watch line splitter (untyped in the client).
_iter_lines: Any = _watch_mod.iter_resp_lines


def _pod_path(namespace: str, name: str) -> str:
    return f"/api/v1/namespaces/{quote(namespace, safe='')}/pods/{quote(name, safe='')}"
