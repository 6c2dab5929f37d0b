"""Pod manifests and node-side lookups shared by the testbed tests.

The lookups go where the agent will look: ``pod<uid>`` cgroups under the node's cgroup root,
``/proc/<pid>/ns/net`` of the pod's processes, ``/var/run/netns/cni-*`` inside the node's
mount namespace, and host-local's reservations under the node's ``/var/lib/cni``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from testbed.node import Testbed


def httpd_pod(name: str, image: str, port: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "terminationGracePeriodSeconds": 5,
            "containers": [
                {
                    "name": "app",
                    "image": image,
                    "env": [{"name": "PORT", "value": str(port)}],
                    "readinessProbe": {
                        "httpGet": {"path": "/", "port": port},
                        "periodSeconds": 1,
                    },
                }
            ],
        },
    }


def client_pod(name: str, image: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "terminationGracePeriodSeconds": 5,
            "containers": [
                {
                    "name": "client",
                    "image": image,
                    "readinessProbe": {
                        "exec": {"command": ["sh", "-c", "test -x /bin/wget"]},
                        "periodSeconds": 1,
                    },
                }
            ],
        },
    }


def manifest(namespace: str, pods: list[dict[str, Any]]) -> str:
    items = [{**p, "metadata": {**p["metadata"], "namespace": namespace}} for p in pods]
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": items})


def wait_service_account(bed: Testbed, namespace: str, timeout: float = 30.0) -> None:
    """Until the controller-manager has made ``namespace``'s default ServiceAccount, which
    ServiceAccount admission wants before it admits a pod (its token is projected at start)."""
    deadline = time.monotonic() + timeout
    while True:
        got = bed.kubectl("get", "serviceaccount", "default", "-n", namespace, check=False)
        if got.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"no default service account in {namespace} after {timeout}s")
        time.sleep(0.1)


def wait_ready(bed: Testbed, namespace: str, names: list[str], timeout: float = 90.0) -> float:
    """Seconds until every named pod is Ready (probes passing)."""
    started = time.monotonic()
    while True:
        out = bed.kubectl("get", "pods", "-n", namespace, "-o", "json").stdout
        ready = {
            p["metadata"]["name"]
            for p in json.loads(out)["items"]
            if any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in p.get("status", {}).get("conditions", [])
            )
        }
        if set(names) <= ready:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"pods not Ready after {timeout}s: {set(names) - ready}\n{out}")
        time.sleep(0.2)


def pod_cgroup_dirs(bed: Testbed, uid: str, v1_only: bool = False) -> list[Path]:
    """``<hierarchy>/<cgroup_root>/kubepods/.../pod<uid>`` in every hierarchy that has it.
    kubelet (cgroupfs driver, v1) removes a deleted pod's v1 cgroups; the empty copies runc
    made in the v2 ``unified`` hierarchy stay until ``down``, hence ``v1_only``."""
    found: list[Path] = []
    for root in bed.layout.cgroup_dirs():
        if v1_only and root.parent.name == "unified":
            continue
        # os.walk, not glob: cgroups vanish while we look, and a vanished one is just skipped.
        for parent, subdirs, _ in os.walk(root / "kubepods", onerror=lambda _e: None):
            found += [Path(parent) / d for d in subdirs if d == f"pod{uid}"]
    return found


def pod_pids(bed: Testbed, uid: str) -> set[int]:
    pids: set[int] = set()
    for d in pod_cgroup_dirs(bed, uid):
        for parent, _, files in os.walk(d, onerror=lambda _e: None):
            if "cgroup.procs" in files:
                with contextlib.suppress(OSError):
                    pids.update(int(x) for x in (Path(parent) / "cgroup.procs").read_text().split())
    return pids


def node_netns_files(bed: Testbed) -> dict[int, str]:
    """inode -> path of every ``/var/run/netns/cni-*`` inside the node's mount namespace."""
    script = "for f in /var/run/netns/cni-*; do [ -e $f ] && echo $(stat -L -c %i $f) $f; done"
    out = bed.node_exec(["sh", "-c", script + "; true"]).stdout
    return {int(i): p for i, p in (line.split() for line in out.splitlines() if line.strip())}


def netns_inode(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino
