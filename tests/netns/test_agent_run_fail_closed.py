"""``istio-cni-agent run --install`` as the DaemonSet runs it, with the API server
unreachable (a refused loopback address): the installer puts the plugin and its conflist
entry on the node, the agent keeps trying instead of failing its start, and SIGTERM then
stops it within the grace period *keeping* the plugin and entry (the API could not say
this is an uninstall: fail closed). Host probe rules go to a throwaway node namespace."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from install import conflist
from tests.agent_fakes import wait_for
from tests.throwaway_node import own_namespaces
from tests.unit.test_install_conflist import ref
from tests.unit.test_stop_verdict import unreachable_kubeconfig

pytestmark = pytest.mark.netns
REPO = Path(__file__).resolve().parents[2]
CONF = "10-calico.conflist"


@pytest.fixture
def node_netns() -> Iterator[str]:
    with own_namespaces("icnir") as make:
        yield "/run/netns/" + make("node")


def installed(net: Path, bin_dir: Path) -> bool:
    try:
        entry = conflist.has_entry((net / CONF).read_bytes(), CONF)
    except OSError:
        return False
    return entry and (bin_dir / "istio-cni").exists()


def test_sigterm_while_the_api_is_down_keeps_the_plugin(tmp_path: Path, node_netns: str) -> None:
    net, bin_dir, src, run = (tmp_path / d for d in ("net", "bin", "src", "run"))
    for d in (net, bin_dir, src, run, tmp_path / "proc", tmp_path / "netns"):
        d.mkdir()
    (net / CONF).write_bytes(ref("list.conflist"))
    (src / "istio-cni").write_bytes(b"#!/bin/sh\necho plugin\n")
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "NODE_NAME": "node-1",
        "KUBECONFIG": str(unreachable_kubeconfig(tmp_path)),
        "INSTALL_CNI": "true",
        "POD_NAMESPACE": "istio-cni",
        "MOUNTED_CNI_NET_DIR": str(net),
        "CNI_BIN_SOURCE_DIR": str(src),
        "CNI_BIN_TARGET_DIRS": str(bin_dir),
        "SA_TOKEN_FILE": str(tmp_path / "no-token"),  # credentials from KUBECONFIG
        "CNI_AGENT_RUN_DIR": str(run),
        "ZTUNNEL_UDS_ADDRESS": str(tmp_path / "zt" / "ztunnel.sock"),
        "HEALTH_PORT": "0",
        "MONITORING_PORT": "0",
        "HOST_PROC": str(tmp_path / "proc"),
        "HOST_NETNS_DIR": str(tmp_path / "netns"),
        "NODE_NETNS": node_netns,
    }
    env.pop("ALLOW_SWITCH_TO_HOST_NS", None)
    log = tmp_path / "agent.log"
    with open(log, "wb") as out:
        agent = subprocess.Popen(
            [sys.executable, "-m", "node_agent.cli", "run", "--listen-address", "127.0.0.1"],
            env=env, cwd=REPO, stdout=out, stderr=out,
        )  # fmt: skip
    try:
        wait_for(lambda: installed(net, bin_dir), what="plugin installed while the API is down")
        assert agent.poll() is None  # still trying, not failed
        t0 = time.monotonic()
        agent.send_signal(signal.SIGTERM)
        rc = agent.wait(timeout=30)
        took = time.monotonic() - t0
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    text = log.read_text(errors="replace")
    assert rc == 0, text[-2000:]
    assert took < 5.0, f"stop took {took:.1f}s, beyond the 5 s grace period"
    assert installed(net, bin_dir), text[-2000:]
    assert "cannot tell an upgrade from an uninstall" in text
