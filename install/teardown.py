"""Uninstall or upgrade? Decided from the API server when the agent stops (SPEC §7).

As Istio 1.24 does: if the DaemonSet ``istio-cni-node`` still exists and is not being
deleted, this is a rolling upgrade and everything stays on the host (new pods fail closed
until the next agent is ready); otherwise (DaemonSet gone or deleting, or the API cannot
say) it is an uninstall. Needs ``get`` on that one DaemonSet (see the ClusterRole).
"""

from __future__ import annotations

import logging
from typing import Any

DAEMONSET_NAME = "istio-cni-node"

log = logging.getLogger("install")


def is_upgrade(namespace: str, api: Any | None = None, name: str = DAEMONSET_NAME) -> bool:
    """True when the DaemonSet is still present (a rollout), False otherwise."""
    try:
        if api is None:
            import os

            from kubernetes import client, config

            if os.environ.get("KUBECONFIG"):  # outside a pod (development, the testbed)
                config.load_kube_config(os.environ["KUBECONFIG"])  # type: ignore[no-untyped-call]
            else:
                config.load_incluster_config()  # type: ignore[no-untyped-call]
            api = client.AppsV1Api()
        ds = api.read_namespaced_daemon_set(name, namespace)
    except Exception as e:  # the API's own error types vary; any failure means "not sure"
        log.warning(
            "cannot read DaemonSet %s/%s (%s): treating the stop as an uninstall",
            namespace,
            name,
            e,
        )
        return False
    deleting = getattr(ds.metadata, "deletion_timestamp", None) is not None
    if deleting:
        log.info("DaemonSet %s/%s is being deleted: uninstalling", namespace, name)
        return False
    log.info(
        "DaemonSet %s/%s still present: this is an upgrade, leaving the plugin", namespace, name
    )
    return True
