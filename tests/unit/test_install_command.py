"""``istio-cni-agent install`` as its own process: once, and as a daemon that keeps the
installation until SIGTERM and then uninstalls (or keeps it, for an upgrade)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from install import conflist
from tests.plugin_fakes import ROOT
from tests.unit.test_install_conflist import ref


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    for d in ("net", "bin", "run", "src", "sa"):
        (tmp_path / d).mkdir()
    (tmp_path / "src" / "istio-cni").write_bytes(b"#!/bin/sh\n")
    (tmp_path / "sa" / "token").write_text("service_account_token_string")
    (tmp_path / "sa" / "ca.crt").write_bytes(ref("kube-ca.crt"))
    (tmp_path / "net" / "10-bridge.conf").write_bytes(ref("bridge.conf"))
    return {
        "PATH": os.environ["PATH"],
        "MOUNTED_CNI_NET_DIR": str(tmp_path / "net"),
        "CNI_BIN_TARGET_DIRS": str(tmp_path / "bin"),
        "CNI_BIN_SOURCE_DIR": str(tmp_path / "src"),
        "CNI_AGENT_RUN_DIR": str(tmp_path / "run"),
        "SA_TOKEN_FILE": str(tmp_path / "sa" / "token"),
        "KUBE_CA_FILE": str(tmp_path / "sa" / "ca.crt"),
        "KUBERNETES_SERVICE_HOST": "10.96.0.1",
        "KUBERNETES_SERVICE_PORT": "443",
        "POD_NAMESPACE": "istio-cni",
    }


CMD = [sys.executable, "-m", "node_agent.cli", "install"]


def test_install_once(env: dict[str, str]) -> None:
    proc = subprocess.run([*CMD, "--once"], env=env, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    net = Path(env["MOUNTED_CNI_NET_DIR"])
    assert [p.name for p in net.iterdir()] == ["10-bridge.conflist"]
    assert conflist.has_entry((net / "10-bridge.conflist").read_bytes(), "10-bridge.conflist")
    kc = Path(env["CNI_AGENT_RUN_DIR"]) / "istio-cni-kubeconfig"
    assert kc.read_bytes() == ref("kubeconfig-tls")


def test_install_errors_are_one_line_no_traceback(env: dict[str, str]) -> None:
    env = {**env, "AMBIENT_ENABLED": "perhaps"}
    proc = subprocess.run([*CMD, "--once"], env=env, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "AMBIENT_ENABLED='perhaps' is not a boolean" in proc.stderr


def test_daemon_keeps_it_installed_then_uninstalls_on_sigterm(env: dict[str, str]) -> None:
    net = Path(env["MOUNTED_CNI_NET_DIR"])
    before = {p.name: p.read_bytes() for p in net.iterdir()}
    proc = subprocess.Popen([*CMD, "--on-exit", "uninstall"], env=env, cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    lines_read: list[str] = []
    reader = threading.Thread(target=lambda: lines_read.extend(proc.stderr or ()), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 20
        # Installed and watching (its "installed" record comes after the watch is set up).
        while not any('"istio-cni installed"' in line for line in lines_read):
            assert time.monotonic() < deadline, "not installed in 20 s"
            time.sleep(0.05)
        # "Another CNI" puts its original file back: the entry is re-inserted.
        (net / "10-bridge.conflist").unlink()
        (net / "10-bridge.conf").write_bytes(ref("bridge.conf"))
        deadline = time.monotonic() + 5
        while not (net / "10-bridge.conflist").exists():
            assert time.monotonic() < deadline, "not repaired within 5 s"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        reader.join(timeout=20)
    err = "".join(lines_read)
    assert proc.returncode == 0, err
    assert {p.name: p.read_bytes() for p in net.iterdir()} == before
    assert list(Path(env["CNI_BIN_TARGET_DIRS"]).iterdir()) == []
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any("restored original CNI config" in rec["msg"] for rec in lines)
