"""Istio's native nftables on the real single-node Kubernetes (issue 17 item 3): our chart
with ``global.nativeNftables=true`` through Helm's engine, the ``istio-cni-node`` DaemonSet
running our image. Pods created through the API come up enrolled with the nftables in-pod
rules (tables ``inet istio-ambient-*`` in the pod, no iptables rule there), and kubelet's
readiness probes reach them through the nftables host probe: the pod's address is in the
``istio-inpod-probes-v4`` set of ``inet istio-ambient-nat`` in the node namespace and the
UID-matched SNAT rule's counter grows while kubelet probes. No ipset is created on the node;
``helm uninstall`` leaves the node as it was before the install.

The same with the agent as a host process on the node (the DaemonSet's environment, no
image): pods already running are enrolled when their namespace is labelled, and stay Ready
through the nftables host probe."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from testbed import daemonset as D
from testbed.mesh import mesh_env
from testbed.node import Testbed
from testbed.node_state import NodeState, differences
from tests.testbed import pods as P
from tests.testbed.agent_on_node import NodeAgent
from tests.testbed.test_plugin_deploy import (
    NodeProcess,
    agent_image_ref,
    built_image,
    ensure_namespace,
    fresh_host_probe_state,
    leave_mesh_and_delete,
    pod_log,
    uninstall_quietly,
    wait,
)

pytestmark = [pytest.mark.testbed, pytest.mark.timeout(1200)]
# No NEEDS_AGENT_IMAGE: the DaemonSet test builds the image through its fixture (cached
# base: the app layer only), the host-process one needs none.
__all__ = ["agent_image_ref", "built_image"]  # the image fixtures, shared


def snat_packets(bed: Testbed) -> int | None:
    """Packets the host probe SNAT rule has matched, or None when it is not there."""
    out = bed.node_exec(["nft", "list", "chain", "inet", "istio-ambient-nat", "postrouting"],
                        check=False).stdout  # fmt: skip
    m = re.search(r"skuid \d+ ip daddr @istio-inpod-probes-v4 counter packets (\d+)", out)
    return int(m.group(1)) if m else None


def probe_set(bed: Testbed) -> str:
    return bed.node_exec(["nft", "list", "set", "inet", "istio-ambient-nat",
                          "istio-inpod-probes-v4"], check=False).stdout  # fmt: skip


def in_pod(bed: Testbed, uid: str, argv: list[str]) -> str:
    pid = min(P.pod_pids(bed, uid))
    return bed.node_exec(["nsenter", f"--net=/proc/{pid}/ns/net", "--", *argv]).stdout


def test_native_nftables_enrols_with_nftables_and_probes_pass_the_nft_host_probe(
    testbed_node: Testbed, testbed_info: dict[str, Any], agent_image_ref: str, tmp_path: Path
) -> None:
    bed, info = testbed_node, testbed_info
    ensure_namespace(bed)
    fresh_host_probe_state(info)
    before = NodeState.take(bed, info)
    vals = D.values(info, "iptables", agent_image_ref)  # the chart's default mode...
    vals["global"] = {"nativeNftables": True}  # ...which Istio's switch turns into nftables
    D.install(bed, vals)
    standin = NodeProcess(bed, [sys.executable, "-m", "testbed.ztunnel_standin", "--socket",
                                info["ztunnel_socket_in_node"], "--access-log",
                                str(tmp_path / "access.log"), "--ca-dir", str(tmp_path / "ca")],
                          mesh_env(info, "nftables"), tmp_path / "standin.log")  # fmt: skip
    ns = "nativenft"
    try:
        agent = D.wait_ready(bed, timeout=180)
        log = pod_log(bed, agent)
        assert "native nftables: pods and host probe through nftables" in log, log[-3000:]
        assert snat_packets(bed) is not None, "host probe rule missing"
        bed.kubectl("create", "namespace", ns)
        bed.kubectl("label", "namespace", ns, "istio.io/dataplane-mode=ambient")
        P.wait_service_account(bed, ns)
        bed.kubectl("apply", "-f", "-", input=P.manifest(ns, [
            P.httpd_pod("web", info["images"]["httpd"], 8080)]))  # fmt: skip
        P.wait_ready(bed, ns, ["web"], timeout=180)  # kubelet's readiness probe passed
        web = json.loads(bed.kubectl("get", "pod", "web", "-n", ns, "-o", "json").stdout)
        assert web["metadata"]["annotations"]["ambient.istio.io/redirection"] == "enabled"
        ip, uid = web["status"]["podIP"], web["metadata"]["uid"]
        # In the pod: the nftables rules, not iptables ones.
        tables = in_pod(bed, uid, ["nft", "list", "tables"])
        assert "table inet istio-ambient-nat" in tables, tables
        assert "ISTIO" not in in_pod(bed, uid, ["iptables-save"])
        # On the node: the pod's address in the nftables probe set, kubelet's probes SNATed.
        assert re.search(rf"{re.escape(ip)} comment \"{uid}\"", probe_set(bed)), probe_set(bed)
        first = snat_packets(bed)
        assert first is not None
        wait(lambda: (snat_packets(bed) or 0) > first, 60, "kubelet probes through the rule")
        assert not [s for s in bed.node_exec(["ipset", "list", "-n"], check=False).stdout.split()
                    if s.startswith("istio-inpod-probes")]  # fmt: skip
        P.wait_ready(bed, ns, ["web"], timeout=30)  # still Ready: probes keep passing
        # Out of the mesh, then uninstall: nothing of ours left on the node.
        bed.kubectl("label", "namespace", ns, "istio.io/dataplane-mode-")
        wait(lambda: ip not in probe_set(bed), 60, "the pod out of the probe set")
        D.uninstall(bed)
        D.wait_gone(bed)
        assert differences(before, NodeState.take(bed, info)) == {}
        assert snat_packets(bed) is None
    finally:
        leave_mesh_and_delete(bed, ns)
        uninstall_quietly(bed)
        standin.stop()


def test_host_process_agent_with_native_nftables_keeps_probes_passing(
    testbed_node: Testbed, testbed_info: dict[str, Any]
) -> None:
    bed, info = testbed_node, testbed_info
    fresh_host_probe_state(info)
    before = NodeState.take(bed, info)
    agent = NodeAgent(bed, info, backend="iptables")
    agent.env["NATIVE_NFTABLES"] = "true"
    ns = "nativenft-host"
    try:
        agent.start_standin()
        agent.start()
        wait(agent.ready, 90, "the agent ready with ztunnel connected")
        assert "native nftables: pods and host probe through nftables" in agent.agent_log()
        bed.kubectl("create", "namespace", ns)
        P.wait_service_account(bed, ns)
        bed.kubectl("apply", "-f", "-", input=P.manifest(ns, [
            P.httpd_pod("web", info["images"]["httpd"], 8080)]))  # fmt: skip
        P.wait_ready(bed, ns, ["web"], timeout=180)
        bed.kubectl("label", "namespace", ns, "istio.io/dataplane-mode=ambient")

        def web() -> dict[str, Any]:
            doc: dict[str, Any] = json.loads(
                bed.kubectl("get", "pod", "web", "-n", ns, "-o", "json").stdout
            )
            return doc

        wait(lambda: web()["metadata"].get("annotations", {}).get(
            "ambient.istio.io/redirection") == "enabled", 60, "the pod enrolled")  # fmt: skip
        ip, uid = web()["status"]["podIP"], web()["metadata"]["uid"]
        assert "table inet istio-ambient-nat" in in_pod(bed, uid, ["nft", "list", "tables"])
        assert re.search(rf"{re.escape(ip)} comment \"{uid}\"", probe_set(bed)), probe_set(bed)
        first = snat_packets(bed)
        assert first is not None
        wait(lambda: (snat_packets(bed) or 0) > first, 60, "kubelet probes through the rule")
        P.wait_ready(bed, ns, ["web"], timeout=30)
        bed.kubectl("label", "namespace", ns, "istio.io/dataplane-mode-")
        wait(lambda: ip not in probe_set(bed), 60, "the pod out of the probe set")
        agent.stop()  # no DaemonSet targets the node: an uninstall, host state removed
        wait(lambda: snat_packets(bed) is None, 30, "the host probe table removed")
        assert differences(before, NodeState.take(bed, info)) == {}
    finally:
        agent.stop()
        agent.cleanup()
        leave_mesh_and_delete(bed, ns)
