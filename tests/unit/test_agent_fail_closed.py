"""The agent fails closed at start (issue 14.2): an API server that cannot be listed keeps
the agent trying, not ready, with the plugin and its conflist entry installed (new pods
wait); it becomes ready once the API returns, and a stop while the API cannot say whether
this is an uninstall keeps the plugin on the node. The installer is the real one on a
scratch node tree, the stop question the real client against an unreachable address."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from install import conflist
from install.installer import Installer
from node_agent.agent_assembly import Agent
from tests.agent_fakes import FakeKube, FakeProbes, FakeRules, wait_for
from tests.throwaway_node import agent_config
from tests.unit import test_install_installer as scratch_node
from tests.unit.test_install_conflist import ref
from tests.unit.test_stop_verdict import unreachable_kubeconfig

CONF = "10-calico.conflist"
node = scratch_node.node  # the installer tests' scratch node tree (a fixture)
config = scratch_node.config


def installed(node: dict[str, str]) -> bool:
    path = os.path.join(node["net"], CONF)
    with open(path, "rb") as f:
        entry = conflist.has_entry(f.read(), CONF)
    return entry and os.path.exists(os.path.join(node["bin"], "istio-cni"))


@pytest.fixture
def agent_parts(
    tmp_path: Path,
    node: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[Agent, FakeKube]:
    import kubernetes.client  # noqa: F401  (loaded by the real agent before it stops)

    monkeypatch.setenv("KUBECONFIG", str(unreachable_kubeconfig(tmp_path)))
    with open(os.path.join(node["net"], CONF), "wb") as f:
        f.write(ref("list.conflist"))
    kube = FakeKube()
    kube.fail_lists = 10**6  # the API server is down
    cfg = agent_config(tmp_path / "agent", "")
    installer = Installer(config(node))
    agent = Agent(cfg, kube=kube, rules=FakeRules(), probes=FakeProbes(), installer=installer)
    return agent, kube


def test_api_down_at_start_keeps_trying_then_ready_and_plugin_stays(
    agent_parts: tuple[Agent, FakeKube],
    node: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    agent, kube = agent_parts
    cancel = threading.Event()
    outcome: list[Any] = []
    t = threading.Thread(target=lambda: outcome.append(agent.start(0.3, cancel)))
    caplog.set_level(logging.WARNING, logger="node_agent.agent")
    t.start()
    try:
        wait_for(lambda: installed(node), what="plugin installed while the API is down")
        # Well past the sync timeout, several times over: still trying, not ready, no error.
        wait_for(
            lambda: sum("cannot sync" in r.getMessage() for r in caplog.records) >= 3,
            what="repeated 'still trying' warnings",
        )
        assert not outcome and not agent.is_ready() and installed(node)
        kube.fail_lists = 0  # the API server is back
        wait_for(agent.is_ready, what="ready once the API returns")
        t.join()
        assert outcome == [True]
    finally:
        cancel.set()
        t.join()
        # The stop asks the API (still unreachable from the stop question): not an
        # uninstall, so the plugin and its conflist entry stay.
        agent.stop()
    assert installed(node)


def test_stop_during_a_start_that_cannot_sync_keeps_the_plugin(
    agent_parts: tuple[Agent, FakeKube],
    node: dict[str, str],
) -> None:
    agent, _ = agent_parts
    cancel = threading.Event()
    outcome: list[Any] = []
    t = threading.Thread(target=lambda: outcome.append(agent.start(0.3, cancel)))
    t.start()
    wait_for(lambda: installed(node), what="plugin installed")
    cancel.set()  # SIGTERM while the API is down
    t.join()
    assert outcome == [False]
    agent.stop()
    assert installed(node)
