"""The Kubernetes API edge: the ONLY module that imports the official ``kubernetes`` client.

It lists and watches pods of one node (field selector ``spec.nodeName``) and all
namespaces, reads one pod, and merge-patches the redirection annotation on
``pods/status``. Responses are read as raw JSON (no model objects: memory stays flat with
thousands of pods) and handed on as dicts; :mod:`node_agent.resources` parses them.
A watch that the server answers with 410 Gone raises
:class:`~node_agent.informers.ResourceExpired`, so the informer relists.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.watch import watch as _watch_mod

from cni_plugin import constants as c
from cni_plugin.errors import ConfigError, IstioCniError
from node_agent.informers import ApiUnavailable, ResourceExpired, WatchEvent

MERGE_PATCH = "application/merge-patch+json"


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
        cfg = client.Configuration()
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
        # Typed as Any: we call with _preload_content=False and read raw JSON responses,
        # which the generated signatures do not describe.
        self._api_client: Any = client.ApiClient(cfg)
        self._core: Any = client.CoreV1Api(self._api_client)
        self._timeout = request_timeout

    def close(self) -> None:
        self._api_client.close()

    # -- pods ---------------------------------------------------------------------------
    def list_pods(self, node_name: str) -> tuple[list[dict[str, Any]], str]:
        try:
            resp = self._core.list_pod_for_all_namespaces(
                field_selector=f"spec.nodeName={node_name}",
                _preload_content=False,
                _request_timeout=self._timeout,
            )
        except Exception as e:
            raise KubeError(f"cannot list pods: {e}") from None
        _check(resp, "list pods")
        body = json.loads(resp.data)
        return list(body.get("items") or []), body["metadata"].get("resourceVersion", "")

    def watch_pods(
        self, node_name: str, resource_version: str, timeout_seconds: int
    ) -> Iterator[WatchEvent]:
        return self._watch(
            self._core.list_pod_for_all_namespaces,
            "watch pods",
            resource_version,
            timeout_seconds,
            field_selector=f"spec.nodeName={node_name}",
        )

    def get_pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            resp = self._core.read_namespaced_pod(
                name, namespace, _preload_content=False, _request_timeout=self._timeout
            )
        except Exception as e:
            raise KubeError(f"cannot read pod {namespace}/{name}: {e}") from None
        if int(resp.status) == 404:
            return None
        _check(resp, f"read pod {namespace}/{name}")
        pod: dict[str, Any] = json.loads(resp.data)
        return pod

    def patch_redirection(self, namespace: str, name: str, value: str | None) -> bool:
        """Merge-patch the redirection annotation on pods/status; False when the pod is gone."""
        body = {"metadata": {"annotations": {c.REDIRECTION_ANNOTATION: value}}}
        try:
            resp = self._core.patch_namespaced_pod_status(
                name,
                namespace,
                body,
                _content_type=MERGE_PATCH,
                _preload_content=False,
                _request_timeout=self._timeout,
            )
        except client.ApiException as e:
            if e.status == 404:
                return False
            raise KubeError(f"cannot annotate pod {namespace}/{name}: {e.reason}") from None
        except Exception as e:
            raise KubeError(f"cannot annotate pod {namespace}/{name}: {e}") from None
        if int(resp.status) == 404:
            return False
        _check(resp, f"annotate pod {namespace}/{name}")
        return True

    # -- namespaces ----------------------------------------------------------------------
    def list_namespaces(self) -> tuple[list[dict[str, Any]], str]:
        try:
            resp = self._core.list_namespace(_preload_content=False, _request_timeout=self._timeout)
        except Exception as e:
            raise KubeError(f"cannot list namespaces: {e}") from None
        _check(resp, "list namespaces")
        body = json.loads(resp.data)
        return list(body.get("items") or []), body["metadata"].get("resourceVersion", "")

    def watch_namespaces(self, resource_version: str, timeout_seconds: int) -> Iterator[WatchEvent]:
        return self._watch(
            self._core.list_namespace, "watch namespaces", resource_version, timeout_seconds
        )

    # -- shared --------------------------------------------------------------------------
    def _watch(
        self, method: Any, what: str, resource_version: str, timeout_seconds: int, **kw: Any
    ) -> Iterator[WatchEvent]:
        try:
            resp = method(
                watch=True,
                resource_version=resource_version,
                timeout_seconds=timeout_seconds,
                allow_watch_bookmarks=True,
                _preload_content=False,
                # Read deadline past the server-side timeout: a silent dead connection
                # (API server killed) ends the watch instead of hanging forever.
                _request_timeout=(self._timeout, timeout_seconds + 15),
                **kw,
            )
        except urllib3.exceptions.HTTPError as e:  # refused, reset, timed out
            raise ApiUnavailable(f"cannot {what}: {e}") from None
        except Exception as e:
            raise KubeError(f"cannot {what}: {e}") from None
        _check(resp, what)
        try:
            iter_lines: Any = _watch_mod.iter_resp_lines
            lines: Iterator[str] = iter_lines(resp)
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
        except (ResourceExpired, KubeError):
            raise
        except urllib3.exceptions.HTTPError as e:
            raise ApiUnavailable(f"{what} interrupted: {e}") from None
        except Exception as e:
            raise KubeError(f"{what} interrupted: {e}") from None
        finally:
            resp.release_conn()
