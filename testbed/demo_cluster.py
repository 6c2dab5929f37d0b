"""The demo's view of the running node: pods from the API, the agent's state, the logs.

Role: small read/wait helpers over one :class:`~testbed.node.Testbed` with ``--mesh``, for
:mod:`testbed.demo_steps`. Every wait has a deadline and fails with :class:`DemoError`
naming what did not happen and where to look; nothing here changes the cluster.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from cni_plugin import constants as c
from node_agent.pods_command import STATE_FILE
from testbed.node import Testbed

T = TypeVar("T")
AGENT = "istio-cni-agent"
AGENT_CONTAINER = "install-cni"


def json_records(lines: Iterable[str]) -> list[dict[str, Any]]:
    """The JSON objects among log lines (other lines, a process's plain output, skipped)."""
    out: list[dict[str, Any]] = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


class DemoError(RuntimeError):
    """A step's fact did not hold or a piece is missing; the message says what to do."""


class Cluster:
    """Reads of one node: ``bed`` up with the mesh, ``info`` as ``up`` returned it."""

    def __init__(
        self, bed: Testbed, info: dict[str, Any], agent_pod: dict[str, Any] | None = None
    ) -> None:
        self.bed = bed
        self.info = info
        # The istio-cni-node pod (DaemonSet) the agent runs in, as first seen Ready; None when
        # the agent is the testbed's host process (`up --mesh`, as the enrol-under-traffic
        # scenario runs it).
        self._agent_pod = agent_pod
        from kubernetes import client

        self.core = client.CoreV1Api(bed.kube_client())

    # --- API -------------------------------------------------------------------------------
    def pods(self, namespace: str) -> dict[str, dict[str, Any]]:
        """name -> pod (as JSON) of every pod in ``namespace``."""
        resp: Any = self.core.list_namespaced_pod(namespace, _preload_content=False)
        items = json.loads(resp.data)["items"]
        return {p["metadata"]["name"]: p for p in items}

    def pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.pods(namespace).get(name)

    # --- the agent ---------------------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return Path(self.info["istio_cni_run_dir"])

    def agent_state(self) -> dict[str, Any]:
        try:
            doc: dict[str, Any] = json.loads((self.run_dir / STATE_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return doc

    def agent_pods(self, namespace: str) -> dict[str, dict[str, Any]]:
        pods = self.agent_state().get("pods", [])
        return {p["name"]: p for p in pods if p.get("namespace") == namespace}

    @property
    def agent_pod(self) -> dict[str, Any]:
        if self._agent_pod is None:
            raise DemoError("no istio-cni-node pod: this node runs the agent as a host process")
        return self._agent_pod

    @property
    def agent_pod_name(self) -> str:
        return str(self.agent_pod["metadata"]["name"])

    def log_path(self, name: str) -> Path:
        """A node process's log; for ``istio-cni-agent`` the pod's container log, which
        kubelet writes under the node's /var/log/pods (bound from the state dir)."""
        if name == AGENT and self._agent_pod is not None:
            meta = self._agent_pod["metadata"]
            pod = f"{meta['namespace']}_{meta['name']}_{meta['uid']}"
            pod_dir = Path(self.info["run_dir"]) / "var-log" / "pods" / pod / AGENT_CONTAINER
            logs = sorted(pod_dir.glob("*.log"), key=lambda p: p.stat().st_mtime)
            return logs[-1] if logs else pod_dir / "0.log"
        return Path(self.info["logs_dir"]) / f"{name}.log"

    def _lines(self, name: str) -> list[str]:
        """The log's lines, without the CRI prefix (time, stream, P/F) of container logs."""
        text = self.log_path(name).read_text(errors="replace")
        lines = text.splitlines()
        if name == AGENT and self._agent_pod is not None:
            lines = [ln.split(" ", 3)[3] if ln.count(" ") >= 3 else ln for ln in lines]
        return lines

    def log_records(self, name: str) -> list[dict[str, Any]]:
        """JSON lines of a mesh process's log (non-JSON lines skipped)."""
        try:
            lines = self._lines(name)
        except OSError:
            return []
        return json_records(lines)

    def log_tail(self, name: str, lines: int = 12) -> str:
        try:
            return "\n".join(self._lines(name)[-lines:])
        except OSError:
            return f"(no log at {self.log_path(name)})"

    def dead_mesh_processes(self) -> dict[str, str]:
        """name -> how it ended, for the mesh processes (installer excluded: it stays up
        to watch, but its exit is not fatal here) that are no longer running."""
        out: dict[str, str] = {}
        exited = self.bed._launcher.exited()  # our own node: its launcher holds the children
        for name, pid in (self.info.get("mesh_pids") or {}).items():
            if name == "istio-cni-install":
                continue
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                state = "gone"
            if state in ("Z", "X", "gone") or name in exited:
                rc = exited.get(name)
                how = (
                    f"killed by {signal.Signals(-rc).name}"
                    if rc is not None and rc < 0
                    else (f"exit code {rc}" if rc is not None else "not running")
                )
                out[name] = f"pid {pid} {how}"
        return out

    def agent_pod_problem(self) -> str | None:
        """Why the istio-cni-node pod is not the healthy one first seen: gone, restarted,
        not running (None when it is)."""
        name = self.agent_pod_name
        pod = self.pod(self.agent_pod["metadata"]["namespace"], name)
        if pod is None or pod["metadata"]["uid"] != self.agent_pod["metadata"]["uid"]:
            return f"pod {name} is gone"
        st = (pod.get("status", {}).get("containerStatuses") or [{}])[0]
        if st.get("restartCount"):
            last = (st.get("lastState") or {}).get("terminated") or {}
            return (f"pod {name} restarted {st['restartCount']}x (last exit "
                    f"{last.get('exitCode')} {last.get('reason')})")  # fmt: skip
        if "running" not in (st.get("state") or {}):
            return f"pod {name} not running: {st.get('state')}"
        return None

    def assert_mesh_alive(self) -> None:
        problem = self.agent_pod_problem()
        if problem:
            raise DemoError(f"the agent's DaemonSet pod failed: {problem}. Its log:\n"
                            f"{self.log_tail(AGENT, 8)}")  # fmt: skip
        dead = self.dead_mesh_processes()
        deadline = time.monotonic() + 3
        while any("not running" in how for how in dead.values()) and time.monotonic() < deadline:
            # a crashing process shows as a zombie before its exit status can be collected
            time.sleep(0.2)
            dead = self.dead_mesh_processes()
        if dead:
            tails = "\n".join(f"--- {n} log tail ---\n{self.log_tail(n, 6)}" for n in dead)
            raise DemoError(
                "mesh process died: "
                + "; ".join(f"{n} ({how})" for n, how in dead.items())
                + f". A SIGSEGV shows in the kernel log (dmesg). Logs:\n{tails}"
            )

    # --- the stand-in's access log -----------------------------------------------------------
    @property
    def access_log(self) -> Path:
        path = self.info.get("ztunnel_access_log")
        if not path:
            raise DemoError(
                "the testbed's mesh hook does not say where the ztunnel stand-in writes its "
                "access log (info['ztunnel_access_log']): update testbed/mesh.py"
            )
        return Path(path)

    def access_offset(self) -> int:
        try:
            return self.access_log.stat().st_size
        except FileNotFoundError:
            return 0

    def access_records(self, since: int = 0) -> list[dict[str, Any]]:
        try:
            with open(self.access_log, "rb") as f:
                f.seek(since)
                data = f.read().decode(errors="replace")
        except FileNotFoundError:
            return []
        out = []
        for line in data.splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out


def wait_for(what: str, timeout: float, probe: Callable[[], T | None], hint: str = "") -> T:
    """Poll ``probe`` until it returns something truthy; :class:`DemoError` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise DemoError(f"{what}: not after {timeout:g}s." + (f" {hint}" if hint else ""))
        time.sleep(0.1)


def is_ready(pod: dict[str, Any]) -> bool:
    conds = pod.get("status", {}).get("conditions", [])
    return any(x["type"] == "Ready" and x["status"] == "True" for x in conds)


def ready_since(pod: dict[str, Any]) -> str | None:
    for x in pod.get("status", {}).get("conditions", []):
        if x["type"] == "Ready":
            return str(x.get("lastTransitionTime"))
    return None


def container_facts(pod: dict[str, Any]) -> dict[str, Any]:
    """What a restart would change: restart count, container id, start time, Ready since."""
    st = (pod.get("status", {}).get("containerStatuses") or [{}])[0]
    return {
        "restarts": st.get("restartCount"),
        "container_id": st.get("containerID"),
        "started_at": (st.get("state", {}).get("running") or {}).get("startedAt"),
        "ready_since": ready_since(pod),
    }


def redirection_annotation(pod: dict[str, Any]) -> str | None:
    value = (pod["metadata"].get("annotations") or {}).get(c.REDIRECTION_ANNOTATION)
    return None if value is None else str(value)
