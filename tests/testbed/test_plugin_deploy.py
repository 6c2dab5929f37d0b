"""The deployment on the real single-node Kubernetes: the manifests go through the real
kube-apiserver (schema and RBAC objects), the agent runs with the istio-cni
ServiceAccount's own token (so a missing or excessive permission shows), its in-process
installer chains the built plugin into containerd's conflist, and pods created through the
API (kubelet -> containerd CRI -> bridge + host-local -> istio-cni) come up enrolled.

The DaemonSet itself cannot start here (its image would need a registry); the agent runs on
the node the way the DaemonSet's container would (node namespaces, DaemonSet env).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.mesh import mesh_env
from testbed.node import Testbed
from tests.netns.test_plugin_chain import built_plugin
from tests.plugin_fakes import ROOT
from tests.testbed import pods as P

pytestmark = [pytest.mark.testbed, pytest.mark.timeout(1800)]
MANIFESTS = os.path.join(ROOT, "install", "manifests", "istio-cni.yaml")
SA = "system:serviceaccount:istio-cni:istio-cni"
__all__ = ["built_plugin"]


def wait(cond: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out ({timeout}s) waiting for {what}")


def sa_kubeconfig(bed: Testbed, info: dict[str, Any], path: Path) -> None:
    """A kubeconfig with a token of the istio-cni ServiceAccount from the TokenRequest API:
    the same kind of bound, expiring token kubelet projects into the DaemonSet's pod (there
    are no token Secrets any more)."""
    out = bed.kubectl("create", "token", "istio-cni", "-n", "istio-cni", "--duration=2h")
    token = out.stdout.strip()
    assert token.count(".") == 2, f"not a JWT: {token[:40]!r}"
    with open(info["kubeconfig_node"]) as f:
        cluster = json.load(f)["clusters"][0]
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "clusters": [cluster],
        "users": [{"name": "istio-cni", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": cluster["name"], "user": "istio-cni"}}],
        "current-context": "sa",
    }))  # fmt: skip


class NodeProcess:
    def __init__(self, bed: Testbed, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with open(log, "ab") as out:
            self.proc = bed.node_popen(argv, env={**os.environ, **env}, cwd=ROOT, stdout=out,
                                       stderr=subprocess.STDOUT)  # fmt: skip

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def conflist_has_istio(info: dict[str, Any]) -> bool:
    for f in Path(info["cni_conf_dir"]).glob("*.conflist"):
        try:
            if any(p.get("type") == "istio-cni" for p in json.loads(f.read_text())["plugins"]):
                return True
        except (OSError, ValueError, KeyError):
            continue
    return False


@pytest.fixture(scope="module")
def deployed(testbed_node: Testbed) -> Iterator[Testbed]:
    """Applied once for the module (a deleted namespace takes a while to go)."""
    bed = testbed_node
    # kube-apiserver checks every object's schema (server-side dry run) before the real apply;
    # the namespace must exist for a dry run of the namespaced objects.
    with open(MANIFESTS) as f:
        namespace_doc = f.read().split("\n---\n")[0]
    assert "kind: Namespace" in namespace_doc
    bed.kubectl("apply", "-f", "-", input=namespace_doc)
    bed.kubectl("apply", "--dry-run=server", "-f", MANIFESTS)
    bed.kubectl("apply", "-f", MANIFESTS)
    try:
        yield bed
    finally:
        bed.kubectl("delete", "--ignore-not-found", "--wait=false", "-f", MANIFESTS, check=False)


def can(bed: Testbed, verb: str, resource: str, *extra: str) -> bool:
    out = bed.kubectl("auth", "can-i", verb, resource, f"--as={SA}", *extra, check=False)
    return out.stdout.strip() == "yes"


def test_rbac_grants_exactly_what_the_agent_uses(deployed: Testbed) -> None:
    bed = deployed
    for verb in ("get", "list", "watch"):
        for res in ("pods", "nodes", "namespaces"):
            assert can(bed, verb, res, "--all-namespaces"), (verb, res)
    assert can(bed, "patch", "pods", "--subresource=status", "-n", "demo")
    assert not can(bed, "update", "pods", "--subresource=status", "-n", "demo")
    assert can(bed, "get", "daemonsets/istio-cni-node", "-n", "istio-cni")
    for verb, res in (("patch", "pods"), ("delete", "pods"),
                      ("create", "pods"), ("get", "secrets"), ("list", "daemonsets"),
                      ("get", "daemonsets/other"), ("update", "namespaces"),
                      ("patch", "nodes")):  # fmt: skip
        assert not can(bed, verb, res, "-n", "istio-cni"), f"{SA} may {verb} {res}"


def test_agent_with_its_own_token_enrolls_pods_created_through_the_api(
    deployed: Testbed, testbed_info: dict[str, Any], built_plugin: str, tmp_path: Path
) -> None:
    bed, info = deployed, testbed_info
    kubeconfig = tmp_path / "istio-cni-sa.kubeconfig"
    sa_kubeconfig(bed, info, kubeconfig)
    env = {
        **mesh_env(info, "iptables"),
        "KUBECONFIG": str(kubeconfig),
        "POD_NAMESPACE": "istio-cni",
        "INSTALL_CNI": "true",
        "CNI_BIN_SOURCE_DIR": os.path.dirname(built_plugin),
        "EXCLUDE_NAMESPACES": "kube-system",
        "HEALTH_PORT": "18000",
        "MONITORING_PORT": "18014",
    }
    standin = NodeProcess(bed, [sys.executable, "-m", "testbed.ztunnel_standin", "--socket",
                                info["ztunnel_socket_in_node"], "--access-log",
                                str(tmp_path / "access.log"), "--ca-dir", str(tmp_path / "ca")],
                          env, tmp_path / "standin.log")  # fmt: skip
    agent = NodeProcess(
        bed, [sys.executable, "-m", "node_agent.cli", "run"], env, tmp_path / "agent.log"
    )
    try:
        wait(lambda: conflist_has_istio(info) or agent.proc.poll() is not None, 120,
             "the installer to chain istio-cni")  # fmt: skip
        assert agent.proc.poll() is None, agent.text()[-3000:]
        assert conflist_has_istio(info)
        assert (Path(info["cni_bin_dir"]) / "istio-cni").read_bytes() == Path(
            built_plugin
        ).read_bytes()

        bed.kubectl("create", "namespace", "mesh")
        bed.kubectl("label", "namespace", "mesh", "istio.io/dataplane-mode=ambient")
        bed.kubectl("create", "namespace", "plain")
        for ns in ("mesh", "plain"):
            P.wait_service_account(bed, ns)
        images = info["images"]
        bed.kubectl("apply", "-f", "-", input=P.manifest("mesh", [
            P.httpd_pod("web", images["httpd"], 8080)]))  # fmt: skip
        bed.kubectl("apply", "-f", "-", input=P.manifest("plain", [
            P.httpd_pod("web", images["httpd"], 8080)]))  # fmt: skip
        P.wait_ready(bed, "mesh", ["web"], timeout=180)
        P.wait_ready(bed, "plain", ["web"], timeout=180)

        def annotation(ns: str) -> str | None:
            pod = json.loads(bed.kubectl("get", "pod", "web", "-n", ns, "-o", "json").stdout)
            value = pod["metadata"].get("annotations", {}).get("ambient.istio.io/redirection")
            return str(value) if value is not None else None

        assert annotation("mesh") == "enabled"  # the plugin returned only after enrolment
        assert annotation("plain") is None
        log = agent.text()
        # RBAC denials read "answered 403: ...Forbidden" in the agent's log (a bare "403" also
        # matches a pid in a path, e.g. icni-tb-pytest24034, and failed a run that way).
        assert "answered 403" not in log and "forbidden" not in log.lower(), log[-3000:]
    finally:
        bed.kubectl("delete", "namespace", "mesh", "plain", "--wait=false", check=False)
        rc = agent.stop()
        standin.stop()
    # The DaemonSet still exists: the agent stopped for an upgrade and left the plugin in place.
    assert rc == 0, agent.text()[-3000:]
    assert conflist_has_istio(info), "upgrade must leave the istio-cni entry"
    assert "this is an upgrade" in agent.text()

    # DaemonSet gone: the next stop is an uninstall, restoring containerd's conflist.
    bed.kubectl("delete", "daemonset", "istio-cni-node", "-n", "istio-cni")
    again = NodeProcess(
        bed, [sys.executable, "-m", "node_agent.cli", "run"], env, tmp_path / "agent2.log"
    )
    try:
        wait(lambda: "istio-cni installed" in again.text() or again.proc.poll() is not None, 120,
             "the second agent to install")  # fmt: skip
    finally:
        assert again.stop() == 0, again.text()[-3000:]
    assert not conflist_has_istio(info), again.text()[-3000:]
    assert not (Path(info["cni_bin_dir"]) / "istio-cni").exists()
