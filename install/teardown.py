"""Uninstall or upgrade? Decided from the API server when the agent stops (SPEC §7).

Fail closed: only a positive answer uninstalls. The plugin, its conflist entry and the host
probe rules are removed only when the API server says this node's agent is going away:
- the DaemonSet ``istio-cni-node`` is gone (404) or being deleted (deletion timestamp);
- it still exists but no longer targets this node (its ``nodeSelector`` or required node
  affinity does not match the node's labels: :func:`install.node_selection.selects_node`);
- the API rejects our credentials (401): the ServiceAccount went with the release, as
  newer Istio reads it;
- the API refuses us the DaemonSet (403): the release's ClusterRoleBinding is gone. ``helm
  uninstall`` deletes the DaemonSet, its RBAC and its ServiceAccount at once, so the pod's
  SIGTERM handler meets 403 or 401 rather than the deletion itself (the chart grants the
  read; the deploy test checks the RBAC is exactly what the agent uses).
Anything else (API unreachable, timeouts, 5xx, the node unreadable) is *unknown* and
keeps everything, so an API outage can never take the plugin off a node: new pods wait
(fail closed) until an agent is ready again. ``AMBIENT_DISABLE_SAFE_UPGRADE`` (Istio's
flag) skips the question and always uninstalls on stop.

The question is asked a few times within ``budget_s`` (well inside the pod's 5 s grace
period, which must also cover the cleanup). Needs ``get`` on that DaemonSet and on nodes
(see the ClusterRole).
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from typing import Any

from install.node_selection import selects_node

DAEMONSET_NAME = "istio-cni-node"

log = logging.getLogger("install")


class StopVerdict(enum.Enum):
    UPGRADE = "upgrade"  # the DaemonSet will bring an agent back here: keep everything
    UNINSTALL = "uninstall"  # positively going away from this node: remove everything
    UNKNOWN = "unknown"  # the API could not say: keep everything (fail closed)


Reader = Callable[[], dict[str, Any]]


def _status(error: BaseException) -> int | None:
    status = getattr(error, "status", None)
    return status if isinstance(status, int) else None


def _ask_once(read_daemonset: Reader, read_node: Reader | None) -> tuple[StopVerdict, str]:
    """One attempt; raises on an error worth retrying."""
    try:
        ds = read_daemonset()
    except Exception as e:  # the client's error types vary; the HTTP status decides
        if _status(e) == 404:
            return StopVerdict.UNINSTALL, "the DaemonSet is gone"
        if _status(e) == 401:
            return StopVerdict.UNINSTALL, "the API rejects our credentials (release removed)"
        if _status(e) == 403:
            return StopVerdict.UNINSTALL, "our permission to read the DaemonSet was revoked"
        raise
    if (ds.get("metadata") or {}).get("deletionTimestamp"):
        return StopVerdict.UNINSTALL, "the DaemonSet is being deleted"
    if read_node is None:
        return StopVerdict.UPGRADE, "the DaemonSet is still present"
    node = read_node()
    pod_spec = ((ds.get("spec") or {}).get("template") or {}).get("spec") or {}
    if not selects_node(pod_spec, node):
        return StopVerdict.UNINSTALL, "the DaemonSet no longer targets this node"
    return StopVerdict.UPGRADE, "the DaemonSet is still present and targets this node"


def decide(
    read_daemonset: Reader,
    read_node: Reader | None = None,
    *,
    attempts: int = 3,
    pause_s: float = 0.3,
    budget_s: float = 2.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[StopVerdict, str]:
    """The verdict and its reason, from at most ``attempts`` tries within ``budget_s``."""
    deadline = clock() + budget_s
    last = ""
    for attempt in range(attempts):
        try:
            return _ask_once(read_daemonset, read_node)
        except Exception as e:
            last = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip()
            log.info("cannot read the DaemonSet or node yet (%s), attempt %d", last, attempt + 1)
        if attempt + 1 < attempts and clock() + pause_s < deadline:
            sleep(pause_s)
        else:
            break
    return StopVerdict.UNKNOWN, f"the API server could not say ({last})"


def _real_readers(
    namespace: str, name: str, node_name: str, timeout_s: float
) -> tuple[Reader, Reader | None]:
    """GETs of the DaemonSet and the node through the client's ``ApiClient`` (auth, TLS,
    pool) read as raw JSON: the generated ``AppsV1Api``/``CoreV1Api`` and their models are
    not imported (tens of MB of the agent's memory, seconds of its start; the agent's
    own API edge, ``node_agent.kube``, does the same). An error status raises the client's
    ``ApiException`` (its ``status`` is what :func:`_ask_once` decides on)."""
    import json
    import os
    from urllib.parse import quote

    from kubernetes import config
    from kubernetes.client.api_client import ApiClient
    from kubernetes.client.configuration import Configuration
    from kubernetes.client.exceptions import ApiException

    cfg = Configuration()
    loader: Any = config
    if os.environ.get("KUBECONFIG"):  # outside a pod (development, the testbed)
        loader.load_kube_config(config_file=os.environ["KUBECONFIG"], client_configuration=cfg)
    else:
        loader.load_incluster_config(client_configuration=cfg)
    cfg.retries = 0  # our own retries, within the budget
    api: Any = ApiClient(cfg)

    def get(path: str) -> dict[str, Any]:
        req = api.param_serialize(
            method="GET",
            resource_path=path,
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
        )
        resp = api.call_api(*req, _request_timeout=timeout_s)
        resp.read()
        if not 200 <= resp.status <= 299:
            raise ApiException(http_resp=resp)
        out: dict[str, Any] = json.loads(resp.data)
        return out

    ns, ds = quote(namespace, safe=""), quote(name, safe="")
    ds_path = f"/apis/apps/v1/namespaces/{ns}/daemonsets/{ds}"
    node_path = f"/api/v1/nodes/{quote(node_name, safe='')}"
    return (lambda: get(ds_path)), ((lambda: get(node_path)) if node_name else None)


class StopQuestion:
    """The real question, through the kubernetes client, for one agent. :meth:`prepare`
    (at start) loads the client and credentials ahead, so the question at stop spends its
    budget on the API server, not on imports (over a second on a loaded node)."""

    def __init__(
        self,
        namespace: str,
        node_name: str = "",
        *,
        name: str = DAEMONSET_NAME,
        disable_safe_upgrade: bool = False,
        request_timeout_s: float = 0.6,
    ) -> None:
        self.namespace = namespace
        self.node_name = node_name
        self.name = name
        self.disable_safe_upgrade = disable_safe_upgrade
        self.request_timeout_s = request_timeout_s
        self._readers: tuple[Reader, Reader | None] | None = None
        self._error = ""

    def prepare(self) -> None:
        if self._readers is not None or self.disable_safe_upgrade:
            return
        try:
            self._readers = _real_readers(
                self.namespace, self.name, self.node_name, self.request_timeout_s
            )
        except Exception as e:  # no credentials at all: the stop will not be able to say
            self._error = f"no API credentials ({e})"

    def verdict(self) -> StopVerdict:
        """Asked once per stop; logged with its reason."""
        if self.disable_safe_upgrade:
            log.info("safe upgrade disabled (AMBIENT_DISABLE_SAFE_UPGRADE): uninstalling on stop")
            return StopVerdict.UNINSTALL
        self.prepare()
        if self._readers is None:
            verdict, reason = StopVerdict.UNKNOWN, self._error
        else:
            verdict, reason = decide(*self._readers)
        if verdict is StopVerdict.UNKNOWN:
            log.warning(
                "cannot tell an upgrade from an uninstall (%s): keeping the plugin, its conflist "
                "entry and the host probe rules (fail closed); if istio-cni really was "
                "uninstalled, delete the istio-cni entry from the CNI config and the istio-cni "
                "binary by hand; `istio-cni-agent redirect uninstall-node` removes the host "
                "probe rule and sets once no pod address is left in them",
                reason,
            )
        else:
            log.info("DaemonSet %s/%s: %s: %s", self.namespace, self.name, reason, verdict.value)
        return verdict

    def __call__(self) -> bool:
        """True (an upgrade: keep everything) unless positively an uninstall."""
        return self.verdict() is not StopVerdict.UNINSTALL


def is_upgrade(namespace: str, node_name: str = "", **kw: Any) -> bool:
    """True unless the API server positively says this is an uninstall from this node."""
    return StopQuestion(namespace, node_name, **kw)()
