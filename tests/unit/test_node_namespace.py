"""Which namespace the host probe rules go to (issue 17.5): with Istio's
ALLOW_SWITCH_TO_HOST_NS (set by the chart) the node's own, ``<HOST_PROC>/1/ns/net``, so a
DaemonSet pod that does not share the host network namespace still writes them on the node;
the agent's own namespace given as the node's is used directly (nothing to enter)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from node_agent.agent_assembly import Agent
from node_agent.config import AgentConfig
from tests.agent_fakes import FakeKube, FakeProbes, FakeRules
from tests.throwaway_node import agent_config


def test_switch_to_host_ns_points_at_the_node_namespace() -> None:
    base = {"NODE_NAME": "n1"}
    assert AgentConfig.from_env(base).node_netns == ""
    switch = {**base, "ALLOW_SWITCH_TO_HOST_NS": "true"}
    assert AgentConfig.from_env(switch).node_netns == "/host/proc/1/ns/net"
    assert AgentConfig.from_env({**switch, "HOST_PROC": "/hp"}).node_netns == "/hp/1/ns/net"
    explicit = {**switch, "NODE_NETNS": "/run/netns/node"}
    assert AgentConfig.from_env(explicit).node_netns == "/run/netns/node"


def test_own_namespace_as_the_node_namespace_is_entered_by_nobody(tmp_path: Path) -> None:
    # hostNetwork pod with the switch on: /host/proc/1/ns/net is our own namespace.
    cfg = replace(agent_config(tmp_path, ""), node_netns="/proc/self/ns/net")
    agent = Agent(cfg, kube=FakeKube(), rules=FakeRules(), probes=FakeProbes())
    assert agent.cfg.node_netns == ""


def test_an_unopenable_node_namespace_is_one_config_error(tmp_path: Path) -> None:
    # /host/proc/1/ns/net of a pid the agent may not inspect (as this machine's own init):
    # one line naming the path and the ways out, not a traceback from the start.
    import pytest

    from cni_plugin.errors import ConfigError
    from node_agent.node_namespace import node_namespace

    with pytest.raises(ConfigError, match=r"cannot open the node's network namespace .*NODE_NETNS"):
        node_namespace(str(tmp_path / "1" / "ns" / "net"))
    assert node_namespace("") == ""
