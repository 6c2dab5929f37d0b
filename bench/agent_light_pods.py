"""Light pods: everything the node agent sees of a pod, without a kubelet.

A light pod is (1) a network namespace, (2) a process (``sleep``) inside it placed in a
cgroup named ``pod<uid>`` of the v1 ``pids`` hierarchy (as kubelet's cgroupfs driver
names them), and (3) a Pod object on a real API server, bound to a Node object of its own,
whose status is set to Running with the pod IP. The agent treats such pods exactly as
kubelet pods: it finds them by the same watch, the same /proc walk and the same netns.
Used by the agent bench (1000 pods are beyond the testbed kubelet on 2 cores) and by tests
that need many pods fast. :meth:`LightNode.cleanup` removes every piece, also after errors.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CGROUP_ROOT = Path("/sys/fs/cgroup/pids")


@dataclass
class LightPod:
    namespace: str
    name: str
    uid: str
    ip: str
    netns: str  # /run/netns/<name>
    proc: subprocess.Popen[bytes]


class LightNode:
    """A Node object plus its light pods. ``core`` is a ``kubernetes`` CoreV1Api (admin)."""

    def __init__(self, core: Any, tag: str | None = None) -> None:
        self.core = core
        self.tag = tag or secrets.token_hex(3)
        self.node_name = f"icnia-light-{self.tag}"
        self.cgroup = CGROUP_ROOT / f"icnia-light-{self.tag}"
        self.pods: list[LightPod] = []
        self.namespaces: list[str] = []
        self._netns: list[str] = []
        self._n = 0
        self._k = 0
        self._procs: list[subprocess.Popen[bytes]] = []

    def create_node(self) -> None:
        from kubernetes import client

        self.core.create_node(
            client.V1Node(
                metadata=client.V1ObjectMeta(name=self.node_name),
                spec=client.V1NodeSpec(
                    taints=[client.V1Taint(key="icnia/light", value="1", effect="NoSchedule")]
                ),
            )
        )

    def create_namespace(self, name: str, labels: dict[str, str] | None = None) -> None:
        from kubernetes import client

        self.core.create_namespace(
            client.V1Namespace(metadata=client.V1ObjectMeta(name=name, labels=labels))
        )
        self.namespaces.append(name)
        # ServiceAccount admission refuses pods until the default account exists.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            sas = self.core.list_namespaced_service_account(name).items
            if any(sa.metadata.name == "default" for sa in sas):
                return
            time.sleep(0.1)
        raise TimeoutError(f"namespace {name}: no default service account after 60s")

    def _new_netns(self, ip: str) -> str:
        self._k += 1
        netns_name = f"icnia-lp-{self.tag}-{self._k}"
        subprocess.run(["ip", "netns", "add", netns_name], check=True)
        self._netns.append(netns_name)
        subprocess.run(["ip", "-n", netns_name, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "-n", netns_name, "addr", "add", f"{ip}/32", "dev", "lo"], check=True)
        return f"/run/netns/{netns_name}"

    def _spawn(self, netns: str, uid: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(["nsenter", f"--net={netns}", "sleep", "100000"])
        self._procs.append(proc)
        # Move it only once nsenter has exec'd sleep inside the namespace.
        target = os.stat(netns).st_ino
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                if os.stat(f"/proc/{proc.pid}/ns/net").st_ino == target:
                    break
            except OSError:
                pass
            time.sleep(0.005)
        cg = self.cgroup / "kubepods" / "besteffort" / f"pod{uid}"
        cg.mkdir(parents=True, exist_ok=True)
        (cg / "cgroup.procs").write_text(str(proc.pid))
        return proc

    def add_pod(
        self,
        namespace: str,
        name: str,
        labels: dict[str, str] | None = None,
        annotations: dict[str, str] | None = None,
        host_netns: str | None = None,
    ) -> LightPod:
        """A running light pod; ``host_netns`` makes it a hostNetwork pod living there."""
        self._n += 1
        ip = f"10.{200 + self._n // 62500 % 50}.{self._n // 250 % 250}.{self._n % 250 + 2}"
        netns = host_netns or self._new_netns(ip)
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": labels or {},
                "annotations": annotations or {},
            },
            "spec": {
                "hostNetwork": host_netns is not None,
                "nodeName": self.node_name,
                "terminationGracePeriodSeconds": 0,
                "tolerations": [{"operator": "Exists"}],
                "containers": [{"name": "app", "image": "icnia.local/none:light"}],
            },
        }
        created = self.core.create_namespaced_pod(namespace, body)
        uid = created.metadata.uid
        proc = self._spawn(netns, uid)
        pod = LightPod(namespace, name, uid, ip, netns, proc)
        self.pods.append(pod)
        self.core.patch_namespaced_pod_status(
            name,
            namespace,
            {"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}},
        )
        return pod

    def replace_netns(self, pod: LightPod) -> str:
        """The sandbox re-created under the same UID: the old process dies, a new one runs
        in a new namespace (same IP). Returns the new namespace path."""
        pod.proc.kill()
        pod.proc.wait()
        pod.netns = self._new_netns(pod.ip)
        pod.proc = self._spawn(pod.netns, pod.uid)
        return pod.netns

    def delete_pod(self, pod: LightPod) -> None:
        self.core.delete_namespaced_pod(pod.name, pod.namespace, grace_period_seconds=0)
        pod.proc.kill()
        pod.proc.wait()

    def label_namespace(self, name: str, labels: dict[str, str | None]) -> None:
        self.core.patch_namespace(name, {"metadata": {"labels": labels}})

    def annotations(self, namespace: str) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for p in self.core.list_namespaced_pod(namespace).items:
            out[p.metadata.uid] = (p.metadata.annotations or {}).get("ambient.istio.io/redirection")
        return out

    def cleanup(self) -> list[str]:
        """Remove everything; returns what could not be removed."""
        problems: list[str] = []
        for ns in self.namespaces:
            with contextlib.suppress(Exception):
                self.core.delete_collection_namespaced_pod(ns, grace_period_seconds=0)
            with contextlib.suppress(Exception):
                self.core.delete_namespace(ns, grace_period_seconds=0)
        with contextlib.suppress(Exception):
            self.core.delete_node(self.node_name)
        for proc in self._procs:
            proc.kill()
        for proc in self._procs:
            proc.wait()
        if self.cgroup.exists():
            for d in sorted(self.cgroup.rglob("*"), key=lambda q: -len(q.parts)):
                if d.is_dir():
                    try:
                        d.rmdir()
                    except OSError as e:
                        problems.append(f"cgroup {d}: {e}")
            try:
                self.cgroup.rmdir()
            except OSError as e:
                problems.append(f"cgroup {self.cgroup}: {e}")
        for name in self._netns:
            r = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True)
            if r.returncode != 0 and "No such file" not in r.stderr:
                problems.append(f"netns {name}: {r.stderr.strip()}")
        return problems


def wait_until(cond: Any, timeout: float, what: str, step: float = 0.05) -> float:
    """Poll ``cond`` until true; returns the seconds it took; raises TimeoutError."""
    t0 = time.monotonic()
    while True:
        if cond():
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(step)
