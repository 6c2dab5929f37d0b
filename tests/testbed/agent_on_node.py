"""Running the node agent and the ztunnel stand-in on the testbed node, as the DaemonSet
would: inside the node's network and mount namespaces (``Testbed.node_popen``), with the
DaemonSet environment of :func:`testbed.mesh.mesh_env` (host paths given by configuration),
talking to the API server through the official client and a kubeconfig. Run dir, ZDS
socket and ports are this test's own, so a ``--mesh`` agent could not collide with it."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from node_agent.state import STATE_FILE
from testbed.mesh import mesh_env
from testbed.node import Testbed

REPO = Path(__file__).resolve().parents[2]


class NodeAgent:
    def __init__(
        self, bed: Testbed, info: dict[str, Any], *, node_name: str | None = None,
        reconcile_seconds: float = 60.0, backend: str = "iptables",
    ) -> None:  # fmt: skip
        self.bed = bed
        self.dir = Path(f"/var/tmp/icnia-agent-{secrets.token_hex(3)}")
        self.dir.mkdir(parents=True)
        self.run_dir = self.dir / "run"
        self.zt_socket = self.dir / "zt" / "ztunnel.sock"
        self.access_log = self.dir / "access.log"
        self.health_port = 18000 + int(secrets.token_hex(1), 16)
        self.env = {
            **mesh_env(info, backend),
            "NODE_NAME": node_name or info["node"],
            "KUBECONFIG": info["kubeconfig_node"],
            "CNI_AGENT_RUN_DIR": str(self.run_dir),
            "ZTUNNEL_UDS_ADDRESS": str(self.zt_socket),
            "HEALTH_PORT": str(self.health_port),
            "MONITORING_PORT": str(self.health_port + 1000),
            "RECONCILE_PERIOD_SECONDS": str(reconcile_seconds),
            "PYTHONPATH": str(REPO),
        }
        self.agent: subprocess.Popen[bytes] | None = None
        self.standin: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.standin_starts = 0

    # -- processes --------------------------------------------------------------------
    def start(self) -> None:
        self.starts += 1
        with open(self.dir / f"agent-{self.starts}.log", "wb") as log:
            self.agent = self.bed.node_popen(
                [sys.executable, "-m", "node_agent.cli", "run"],
                env={**os.environ, **self.env}, stdout=log, stderr=log, cwd=str(REPO),
            )  # fmt: skip

    def start_standin(self) -> None:
        self.standin_starts += 1
        with open(self._standin_log(self.standin_starts), "wb") as log:
            self.standin = self.bed.node_popen(
                [sys.executable, "-m", "testbed.ztunnel_standin", "--socket", str(self.zt_socket),
                 "--access-log", str(self.access_log), "--ca-dir", str(self.dir / "ca")],
                env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=log, stderr=log,
                cwd=str(REPO),
            )  # fmt: skip

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.agent is not None:
            # node_popen runs nsenter, which execs the agent: same pid.
            self.agent.send_signal(sig)
            self.agent.wait(timeout=30)
            self.agent = None

    def kill_standin(self, sig: int = signal.SIGTERM) -> None:
        if self.standin is not None:
            self.standin.send_signal(sig)
            self.standin.wait(timeout=30)
            self.standin = None

    def stop(self) -> None:
        self.kill(signal.SIGTERM)
        self.kill_standin()

    # -- observations -------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        try:
            doc: dict[str, Any] = json.loads((self.run_dir / STATE_FILE).read_text())
        except (OSError, ValueError):
            return {}
        return doc

    def ready(self) -> bool:
        """The agent running now (not a killed one's leftover file) is ready, ztunnel in."""
        st = self.state()
        return (
            self.agent is not None
            and st.get("pid") == self.agent.pid
            and bool(st.get("ready"))
            and bool(st.get("ztunnel_connected"))
        )

    def _standin_log(self, run: int) -> Path:
        return self.dir / ("standin.log" if run == 1 else f"standin-{run}.log")

    def standin_events(self, msg: str, run: int | None = None) -> list[dict[str, Any]]:
        """The stand-in's log records with ``msg``: of every run in order, or of run ``run``
        (1 = the first start; ``self.standin_starts`` = the latest)."""
        out: list[dict[str, Any]] = []
        runs = range(1, self.standin_starts + 1) if run is None else [run]
        text = ""
        for n in runs:
            try:
                text += self._standin_log(n).read_text(errors="replace")
            except OSError:
                continue
        for line in text.splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("msg") == msg:
                out.append(rec)
        return out

    def access_records(self) -> list[dict[str, Any]]:
        try:
            lines = self.access_log.read_text(errors="replace").splitlines()
        except OSError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def agent_log(self, tail: int | None = 4000) -> str:
        parts = []
        for i in range(1, self.starts + 1):
            p = self.dir / f"agent-{i}.log"
            if p.exists():
                text = p.read_text(errors="replace")
                parts.append(text[-tail:] if tail else text)
        return "\n".join(parts)

    def cleanup(self) -> None:
        self.stop()
        subprocess.run(["rm", "-rf", str(self.dir)], check=False)


def wait(cond: Any, timeout: float, what: str, agent: NodeAgent | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    tail = f"\nagent log tail:\n{agent.agent_log()[-3000:]}" if agent is not None else ""
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}{tail}")
