"""How the benchmarks run Istio's own agent (bench/istio_agent.py): the mounts never hand it
the machine's CNI dirs, pod namespaces made later stay visible, and its environment is the
chart's defaults."""

from __future__ import annotations

import base64
import shlex
from pathlib import Path

import yaml

from bench import istio_agent
from bench.istio_peer import PeerBinaries


def _mounts(script: str) -> dict[str, tuple[str, str]]:
    """target -> (flag, source) of every bind in the script."""
    out = {}
    for line in script.splitlines():
        argv = shlex.split(line)
        if argv[:1] == ["mount"] and argv[1] in ("--bind", "--rbind"):
            out[argv[3]] = (argv[1], argv[2])
    return out


def test_the_agent_writes_only_into_scratch_and_sees_new_pod_namespaces(tmp_path: Path) -> None:
    peer = PeerBinaries("v0", tmp_path / "bin", {})
    script = istio_agent.mount_script(tmp_path, peer)
    mounts = _mounts(script)
    root = tmp_path / "root"
    for target in ("host/etc/cni/net.d", "host/opt/cni/bin", "run/istio-cni", "run/ztunnel"):
        _flag, source = mounts[str(root / target)]
        assert Path(source).is_relative_to(tmp_path), f"{target} comes from {source}"
    assert mounts[str(root / "host/var/run/netns")] == ("--rbind", "/run/netns")
    lines = script.splitlines()
    # slave before any bind (HostToContainer), the root bound onto itself first, exec last
    assert (
        lines.index("mount --make-rslave /")
        < lines.index(f"mount --bind {root} {root}")
        < min(i for i, ln in enumerate(lines) if "/run/netns" in ln)
    )
    assert lines[-1] == f"exec chroot {root} /istio/install-cni --log_output_level=info"
    assert mounts[str(root / "opt/cni/bin/istio-cni")] == ("--bind", str(peer.path("istio-cni")))


def test_environment_is_the_charts_defaults_for_the_node() -> None:
    env = istio_agent.install_env("node-7", "10.77.0.2", 6443)
    assert env["NODE_NAME"] == env["REPAIR_NODE_NAME"] == "node-7"
    assert (env["KUBERNETES_SERVICE_HOST"], env["KUBERNETES_SERVICE_PORT"]) == ("10.77.0.2", "6443")
    assert env["AMBIENT_ENABLED"] == env["AMBIENT_DNS_CAPTURE"] == env["AMBIENT_IPV6"] == "true"
    assert env["EXCLUDE_NAMESPACES"] == "kube-system"
    assert "ALLOW_SWITCH_TO_HOST_NS" not in env  # it shares the node's namespace here
    selectors = yaml.safe_load(env["AMBIENT_ENABLEMENT_SELECTOR"])
    assert selectors[0] == {"podSelector": {"matchLabels": {"istio.io/dataplane-mode": "ambient"}}}
    assert selectors[1]["namespaceSelector"] == {
        "matchLabels": {"istio.io/dataplane-mode": "ambient"}
    }


def test_service_account_comes_from_the_token_kubeconfig(tmp_path: Path) -> None:
    kc = tmp_path / "kubeconfig"
    kc.write_text(
        yaml.safe_dump(
            {
                "clusters": [
                    {
                        "cluster": {
                            "server": "https://10.77.0.2:6443",
                            "certificate-authority-data": base64.b64encode(b"PEM").decode(),
                        }
                    }
                ],
                "users": [{"user": {"token": "t0ken"}}],
            }
        )
    )
    assert istio_agent.service_account_from_kubeconfig(kc) == ("t0ken", b"PEM", "10.77.0.2", 6443)


def test_on_a_node_the_volumes_are_the_nodes_and_the_agent_is_pid_1_of_its_own(
    tmp_path: Path,
) -> None:
    peer = PeerBinaries("v0", tmp_path / "bin", {})
    volumes = {"net.d": "/node/net.d", "run": "/var/run/istio-cni", "/run/netns": "/var/run/netns"}
    script = istio_agent.mount_script(tmp_path, peer, volumes, own_pid_namespace=True)
    mounts = _mounts(script)
    root = tmp_path / "root"
    assert mounts[str(root / "host/etc/cni/net.d")] == ("--bind", "/node/net.d")
    assert mounts[str(root / "run/istio-cni")] == ("--bind", "/var/run/istio-cni")
    assert mounts[str(root / "host/var/run/netns")] == ("--rbind", "/var/run/netns")
    # Not replaced: still scratch; /host/proc is the node's, /proc is left to unshare.
    assert Path(mounts[str(root / "host/opt/cni/bin")][1]).is_relative_to(tmp_path)
    assert mounts[str(root / "host/proc")] == ("--bind", "/proc")
    assert str(root / "proc") not in mounts
    last = shlex.split(script.splitlines()[-1])
    assert last[:4] == ["exec", "unshare", "-p", "--fork"]
    assert f"--mount-proc={root / 'proc'}" in last
    assert last[last.index("chroot") + 1 :] == [str(root), "/istio/install-cni",
                                                "--log_output_level=info"]  # fmt: skip
