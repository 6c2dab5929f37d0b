"""The istio-cni plugin chained after the real ``bridge`` + ``host-local`` plugins, run the
way a container runtime runs a chain, in throwaway namespaces, against the real node agent.

The agent is the real one (plugin-event socket, iptables backend, ZDS server, host probe in
a throwaway node namespace); ztunnel is the stand-in process (it opens its listeners in the
pod's namespace before it acks); only the Kubernetes API is faked (tests/agent_fakes.py,
plus an HTTPS stub for the plugin's own API fallback). Each test runs both the plugin's
shipped form (``build/istio-cni``, built on demand, no Python on PATH) and its source form.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cni_plugin import constants as c
from cni_plugin.redirection.registry import make_backend
from cni_plugin.redirection.settings import RedirectSettings
from node_agent.agent_assembly import Agent
from node_agent.host_probe import HostProbe
from tests import plugin_fakes
from tests.agent_fakes import FakeKube, make_pod, wait_for
from tests.cni_chain import Chain, ChainError, k8s_env
from tests.netns.test_standin_zds import StandinProcess, listeners
from tests.plugin_fakes import ROOT, ApiStub
from tests.throwaway_node import agent_config, own_namespaces
from tests.time_scale import scaled

pytestmark = pytest.mark.netns
AMBIENT = {c.DATAPLANE_MODE_LABEL: c.DATAPLANE_MODE_AMBIENT}
SETTINGS = RedirectSettings(dns_capture=False, ipv6=True)
ZTUNNEL_PORTS = {("tcp", 15001), ("tcp", 15006), ("tcp", 15008)}


@pytest.fixture(scope="session")
def built_plugin() -> str:
    return plugin_fakes.built_plugin()


@pytest.fixture(params=["built", "source"])
def plugin_bin(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A directory holding an executable named istio-cni, for CNI_PATH."""
    d = tmp_path / "istio-bin"
    d.mkdir()
    target = d / "istio-cni"
    if request.param == "built":
        # The shipped form is a directory: link to its binary, as the installer does.
        os.symlink(os.path.realpath(request.getfixturevalue("built_plugin")), target)
    else:
        # The source form needs a python3: the runtime's PATH-less env gets an absolute one.
        target.write_text(
            "#!/usr/bin/python3 -IS\n"
            f"import sys; sys.path.insert(0, {ROOT!r})\n"
            "from cni_plugin.plugin import main\nmain()\n"
        )
        target.chmod(0o755)
    return str(d)


class Node:
    """A throwaway node: its namespace, a conflist, the real agent, a ztunnel stand-in."""

    def __init__(self, tmp: Path, make: Callable[[str], str], plugin_dir: str) -> None:
        self.tmp = tmp
        self.make = make
        self.node_ns = make("node")
        self.node_netns = f"/run/netns/{self.node_ns}"
        self.cfg = agent_config(tmp, self.node_netns)
        self.run_dir = self.cfg.run_dir
        os.makedirs(self.run_dir)
        self.kube = FakeKube()
        self.kube.put_namespace("demo")
        self.backend = make_backend("iptables")
        self.agent: Agent | None = None
        self.standin: StandinProcess | None = None
        self.api: ApiStub | None = None
        bridge = f"icb{secrets.token_hex(3)}"
        self.conflist: dict[str, Any] = {
            "cniVersion": "1.0.0",
            "name": "k8s-pod-network",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": bridge,
                    "isGateway": True,
                    "ipMasq": False,
                    "ipam": {
                        "type": "host-local",
                        "subnet": "10.77.0.0/24",
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(tmp / "ipam"),
                    },
                },
                {
                    "type": "istio-cni",
                    "name": "istio-cni",
                    "plugin_log_level": "debug",
                    "cni_agent_run_dir": self.run_dir,
                    "ambient_enabled": True,
                    "exclude_namespaces": ["kube-system"],
                    "pod_namespace": "istio-cni",
                },
            ],
        }
        self.chain = Chain(self.conflist, [plugin_dir, "/usr/lib/cni"], self.node_netns)
        os.makedirs(self.cfg.proc_root)
        self.probe = HostProbe(ipv6=True, node_netns=self.node_netns)

    def start(self) -> None:
        os.makedirs(os.path.dirname(self.cfg.ztunnel_socket), exist_ok=True)
        self.agent = Agent(self.cfg, kube=self.kube, rules=self.backend)
        self.standin = StandinProcess(self.cfg.ztunnel_socket, self.tmp)
        self.standin.start()
        self.agent.start(sync_timeout=scaled(10))
        zds = self.agent.zds
        assert zds is not None
        wait_for(lambda: zds.connected, timeout=20, what="ztunnel stand-in connected")

    def stop_agent(self) -> None:
        if self.agent is not None:
            self.agent.stop()
            self.agent = None

    def close(self) -> None:
        self.stop_agent()
        if self.standin is not None:
            self.standin.stop()
        if self.api is not None:
            self.api.stop()
        self.probe.teardown()

    def pod(self, name: str, **kw: Any) -> tuple[str, str, dict[str, str]]:
        """(uid, netns name, CNI env) of a new pod sandbox known to the API."""
        uid = str(uuid.uuid4())
        self.kube.put_pod(make_pod("demo", name, uid=uid, ip=None, **kw))
        ns = self.make("pod")
        return uid, ns, k8s_env(f"/run/netns/{ns}", "demo", name, uid, uid.replace("-", ""))

    def serve_api(self, *pods: tuple[str, dict[str, str]], ns_labels: dict[str, str]) -> None:
        """The plugin's own API fallback (used when the agent is down)."""
        self.api = ApiStub().start(self.node_netns)  # the plugin runs in the node netns
        for name, labels in pods:
            self.api.add_pod("demo", name, labels=labels, ns_labels=ns_labels)
        self.api.write_kubeconfig(self.run_dir)


@pytest.fixture
def own_netns() -> Iterator[Callable[[str], str]]:
    # Own prefix: a concurrent session's icnit- sweep must not remove a running agent's pods.
    with own_namespaces("icnip") as make:
        yield make


@pytest.fixture
def node(tmp_path: Path, own_netns: Callable[[str], str], plugin_bin: str) -> Iterator[Node]:
    n = Node(tmp_path, own_netns, plugin_bin)
    try:
        yield n
    finally:
        n.close()


def bridge_result(node: Node) -> dict[str, Any]:
    (run,) = [r for r in node.chain.runs if r.plugin == "bridge" and r.command == "ADD"][-1:]
    return run.json()


def test_ambient_add_returns_only_after_rules_and_ztunnel(node: Node) -> None:
    node.kube.put_namespace("demo", AMBIENT)
    node.start()
    uid, ns, env = node.pod("web")
    result = node.chain.add(env)
    # Checked right after the ADD returned, without waiting: the plugin waited for enrolment.
    assert node.backend.check(f"/run/netns/{ns}", SETTINGS).ok
    assert listeners(ns) >= ZTUNNEL_PORTS, "ztunnel stand-in has no listeners in the pod"
    assert node.kube.annotation(uid) == c.REDIRECTION_ENABLED
    assert result == bridge_result(node)  # prevResult passed through untouched
    assert result["ips"][0]["address"].startswith("10.77.0.")
    # CHECK and DEL are harmless when repeated; DEL runs in reverse (istio-cni first).
    node.chain.check(env)
    node.chain.check(env)
    node.chain.delete(env)
    node.chain.delete(env)
    dels = [r.plugin for r in node.chain.runs if r.command == "DEL"]
    assert dels == ["istio-cni", "bridge", "istio-cni", "bridge"]


def test_non_ambient_add_passes_prev_result_through_untouched(node: Node) -> None:
    node.start()
    uid, ns, env = node.pod("plain")
    result = node.chain.add(env)
    assert result == bridge_result(node)
    assert node.backend.check(f"/run/netns/{ns}", SETTINGS).ok is False
    assert node.kube.annotation(uid) is None
    node.chain.delete(env)


def test_agent_stopped_ambient_fails_closed_non_ambient_succeeds(node: Node) -> None:
    node.serve_api(("web", {}), ("plain", {c.DATAPLANE_MODE_LABEL: "none"}), ns_labels=AMBIENT)
    _, _ns, env = node.pod("web")
    with pytest.raises(ChainError) as e:
        node.chain.add(env)
    err = e.value.run.json()
    assert e.value.run.plugin == "istio-cni"
    assert err["code"] == 11 and "failing closed" in err["msg"]
    assert "pluginevent.sock" in err["msg"]
    assert b"Traceback" not in e.value.run.stderr
    node.chain.delete(env)  # the runtime cleans up the failed sandbox: harmless

    _, _ns2, env2 = node.pod("plain")
    result = node.chain.add(env2)
    assert result == bridge_result(node)
    node.chain.delete(env2)


def test_built_plugin_runs_where_there_is_no_python(built_plugin: str, tmp_path: Path) -> None:
    """A chroot holding only the plugin's own directory and /proc: no Python, no C library,
    no shell, nothing of the host's. A private mount namespace holds the /proc mount, gone
    when it exits."""
    root = tmp_path / "root"
    for d in ("bin", "tmp", "proc"):
        (root / d).mkdir(parents=True)
    shutil.copytree(os.path.dirname(os.path.realpath(built_plugin)), root / "bin" / "istio-cni.d")
    os.symlink("istio-cni.d/istio-cni", root / "bin" / "istio-cni")
    outside = [p for p in root.rglob("*") if "istio-cni.d" not in p.parts and not p.is_dir()]
    assert [p.name for p in outside] == ["istio-cni"]  # the link: the host gives nothing else
    conf = {
        "cniVersion": "1.0.0",
        "name": "n",
        "type": "istio-cni",
        "ambient_enabled": False,
        "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.77.0.9/24"}]},
    }
    env = {
        "HOME": "/tmp",
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "c",
        "CNI_NETNS": "/x",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/bin",
    }
    run = [
        "/usr/bin/unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
        'mount -t proc proc "$0/proc" && exec /usr/sbin/chroot "$0" /bin/istio-cni', str(root),
    ]  # fmt: skip
    proc = subprocess.run(
        run, input=json.dumps(conf).encode(), env=env, capture_output=True, timeout=scaled(60)
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"cniVersion": "1.0.0", "ips": [{"address": "10.77.0.9/24"}]}
    proc = subprocess.run(run, input=b"{oops", env=env, capture_output=True, timeout=scaled(60))
    assert proc.returncode != 0 and json.loads(proc.stdout)["code"] == 6


def test_built_plugin_with_a_broken_directory_says_how_to_fix_it(
    built_plugin: str, tmp_path: Path
) -> None:
    """A partial copy (the bundled interpreter's loader gone) is a CNI error on stdout
    naming the missing file and the fix, not a crash the runtime cannot read."""
    copy = tmp_path / "istio-cni.d"
    shutil.copytree(os.path.dirname(os.path.realpath(built_plugin)), copy)
    loader = next(copy.glob("runtime/ld-linux*"), None)
    if loader is None:
        pytest.skip("the shipped form is not the bundled-cpython one")
    loader.unlink()
    proc = subprocess.run(
        [str(copy / "istio-cni")], input=b"{}", env={"CNI_COMMAND": "VERSION"},
        capture_output=True, timeout=scaled(60),
    )  # fmt: skip
    assert proc.returncode == 1
    err = json.loads(proc.stdout)
    assert err["code"] == 999 and str(loader) in err["msg"], err
    assert "restart the istio-cni-node pod" in err["msg"]
