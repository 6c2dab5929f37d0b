"""The node agent started while the real API server is frozen (SIGSTOP: connections hang,
as in an outage), on the real testbed node (issue 14.2): it keeps trying, not ready,
without failing its start; once the API server runs again it becomes ready, enrols the
ambient pod that was waiting and puts its probe address in the node's probe set."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import pytest

from node_agent.host_probe import HostProbe
from testbed.node import Testbed
from tests.testbed.agent_on_node import NodeAgent, wait
from tests.testbed.test_agent_kubelet_pods import AMBIENT, Pods

pytestmark = pytest.mark.testbed
UNREACHABLE = ("api server unreachable", "list/watch failed")


@pytest.fixture
def node_agent(testbed_node: Testbed, testbed_info: dict[str, Any]) -> Iterator[NodeAgent]:
    agent = NodeAgent(testbed_node, testbed_info)
    try:
        yield agent
    finally:
        agent.cleanup()


@pytest.fixture
def pods(kube_api: Any, kube_namespace: str, testbed_info: dict[str, Any]) -> Pods:
    from kubernetes import client

    return Pods(client.CoreV1Api(kube_api), kube_namespace, testbed_info)


def test_agent_started_during_an_api_outage_becomes_ready_when_it_ends(
    node_agent: NodeAgent, pods: Pods, testbed_info: dict[str, Any]
) -> None:
    pods.create("web")
    wait(lambda: pods.running(["web"]), 180, "pod running")
    pods.label(dict(AMBIENT))
    ip = pods.all()["web"].status.pod_ip
    apiserver = int(testbed_info["pids"]["kube-apiserver"])
    node_agent.start_standin()
    os.kill(apiserver, signal.SIGSTOP)
    try:
        node_agent.start()
        wait(
            lambda: sum(node_agent.agent_log(None).count(m) for m in UNREACHABLE) >= 4,
            180, "the agent retrying against the frozen API server", node_agent,
        )  # fmt: skip
        assert node_agent.agent is not None and node_agent.agent.poll() is None, (
            node_agent.agent_log()
        )
        assert not node_agent.ready()
    finally:
        os.kill(apiserver, signal.SIGCONT)
    wait(node_agent.ready, 180, "agent ready once the API server runs", node_agent)
    wait(lambda: pods.ann("web") == "enabled", 90, "the waiting pod enrolled", node_agent)
    probe = HostProbe(node_netns=testbed_info["node_netns"])
    assert probe.members().get(ip) == pods.all()["web"].metadata.uid
