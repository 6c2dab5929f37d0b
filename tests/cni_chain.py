"""Running a CNI plugin chain the way a container runtime (libcni) does, for tests.

ADD runs the conflist's plugins in order, each with the list's ``name`` and ``cniVersion``
and the previous plugin's result as ``prevResult``; DEL runs them in reverse with the
cached ADD result; CHECK in order with it. Plugins are found on ``CNI_PATH`` and executed
inside the "node" network namespace (``nsenter --net``), so the bridge and veths they make
never touch the real host. Every run is kept for the test to inspect.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
from dataclasses import dataclass, field
from typing import Any

from tests.time_scale import scaled


@dataclass
class PluginRun:
    plugin: str
    command: str
    returncode: int
    stdout: bytes
    stderr: bytes
    seconds: float

    def json(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.stdout)
        return doc


class ChainError(Exception):
    def __init__(self, run: PluginRun) -> None:
        super().__init__(f"{run.plugin} {run.command} failed: {run.stdout!r} {run.stderr[-400:]!r}")
        self.run = run


@dataclass
class Chain:
    conflist: dict[str, Any]
    cni_path: list[str]
    node_netns: str  # /run/netns/<name> the plugins run in
    cached: dict[str, Any] | None = None
    runs: list[PluginRun] = field(default_factory=list)

    def _find(self, plugin_type: str) -> str:
        for d in self.cni_path:
            p = os.path.join(d, plugin_type)
            if os.access(p, os.X_OK):
                return p
        raise FileNotFoundError(f"plugin {plugin_type} not on CNI_PATH {self.cni_path}")

    def _exec(
        self, conf: dict[str, Any], command: str, env: dict[str, str], timeout: float = 30
    ) -> PluginRun:
        import time

        exe = self._find(conf["type"])
        netconf = copy.deepcopy(conf)
        netconf["name"] = self.conflist["name"]
        netconf["cniVersion"] = self.conflist["cniVersion"]
        full_env = {"CNI_COMMAND": command, "CNI_PATH": ":".join(self.cni_path), **env}
        # The runtime's environment is not a shell's: no PATH to a Python, nothing inherited.
        full_env.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        t0 = time.monotonic()
        proc = subprocess.run(
            ["nsenter", f"--net={self.node_netns}", "--", exe],
            input=json.dumps(netconf).encode(),
            env=full_env,
            capture_output=True,
            timeout=scaled(timeout),
        )
        run = PluginRun(
            conf["type"], command, proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t0
        )
        self.runs.append(run)
        return run

    def add(self, env: dict[str, str]) -> dict[str, Any]:
        prev: dict[str, Any] | None = None
        for conf in self.conflist["plugins"]:
            c = dict(conf)
            if prev is not None:
                c["prevResult"] = prev
            run = self._exec(c, "ADD", env)
            if run.returncode != 0:
                raise ChainError(run)
            prev = run.json()
        assert prev is not None
        self.cached = prev
        return prev

    def delete(self, env: dict[str, str]) -> None:
        for conf in reversed(self.conflist["plugins"]):
            c = dict(conf)
            if self.cached is not None:
                c["prevResult"] = self.cached
            run = self._exec(c, "DEL", env)
            if run.returncode != 0:
                raise ChainError(run)

    def check(self, env: dict[str, str]) -> None:
        for conf in self.conflist["plugins"]:
            c = dict(conf)
            if self.cached is not None:
                c["prevResult"] = self.cached
            run = self._exec(c, "CHECK", env)
            if run.returncode != 0:
                raise ChainError(run)


def k8s_env(netns: str, namespace: str, name: str, uid: str, container_id: str) -> dict[str, str]:
    return {
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": netns,
        "CNI_IFNAME": "eth0",
        # IgnoreUnknown=1: bridge and host-local reject the K8S_* keys otherwise.
        "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};"
        f"K8S_POD_INFRA_CONTAINER_ID={container_id};K8S_POD_UID={uid}",
    }
