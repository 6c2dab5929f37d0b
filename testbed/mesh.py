"""HOOK for ``istio-cni-testbed up --mesh``: our installer, agent and ztunnel stand-in on the node.

Role: start, inside the node's network + mount namespaces and the way the ``istio-cni-node``
DaemonSet would, (1) ``istio-cni-agent install`` (copies our plugin into the node's CNI bin
dir and appends it to the conflist containerd uses), (2) ``istio-cni-agent run`` (the node
agent, with the chosen redirection backend) and (3) ``python -m testbed.ztunnel_standin``.
Each piece is owned by another issue; when one is not there yet this fails with a message
naming exactly what is missing instead of bringing up a half mesh.

DaemonSet paths map onto the node like this (all visible inside the node's mount ns):
``/host/etc/cni/net.d`` -> ``cni_conf_dir``, ``/host/opt/cni/bin`` -> ``cni_bin_dir``,
``/host/proc`` -> ``/proc``, ``/host/var/run/netns`` -> ``/var/run/netns``,
``/var/run/istio-cni`` and ``/var/run/ztunnel`` as they are (bound from the state dir).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from testbed.node import Testbed

AGENT_COMMANDS = ("install", "run")
HEALTH_PORT = 8000
STANDIN_MODULE = "testbed.ztunnel_standin"


class MeshUnavailable(RuntimeError):
    """A piece ``--mesh`` needs has not landed yet (the message names it)."""


def missing_pieces() -> list[str]:
    """What ``--mesh`` needs but cannot find; empty when everything is there."""
    missing: list[str] = []
    try:
        from node_agent.cli import COMMANDS
    except ImportError as e:
        return [f"node_agent.cli ({e})"]
    for cmd in AGENT_COMMANDS:
        module = COMMANDS.get(cmd)
        if module is None:
            missing.append(f"`istio-cni-agent {cmd}` (no entry in node_agent.cli.COMMANDS)")
        elif not _module_exists(module):
            missing.append(f"`istio-cni-agent {cmd}` (module {module} does not exist yet)")
    if not _module_exists(STANDIN_MODULE):
        missing.append(f"`python -m {STANDIN_MODULE}` (module not there yet)")
    return missing


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:  # a missing parent package
        return False


def mesh_env(info: dict[str, Any], backend: str) -> dict[str, str]:
    """The DaemonSet's environment, with host paths pointing at the node's."""
    return {
        "NODE_NAME": info["node"],
        "POD_NAMESPACE": "istio-cni",
        "KUBECONFIG": info["kubeconfig_node"],
        "KUBERNETES_SERVICE_HOST": info["node_ip"],
        "KUBERNETES_SERVICE_PORT": info["server_in_node"].rsplit(":", 1)[1],
        "CNI_AGENT_RUN_DIR": info["istio_cni_run_dir_in_node"],
        "ZTUNNEL_UDS_ADDRESS": info["ztunnel_socket_in_node"],
        "MOUNTED_CNI_NET_DIR": info["cni_conf_dir"],
        "CNI_BIN_TARGET_DIRS": info["cni_bin_dir"],
        "HOST_PROC": "/proc",
        "HOST_NETNS_DIR": info["cni_netns_dir_in_node"],
        "AMBIENT_REDIRECT_MODE": backend,
        # The ebpf backend pins under a root private to this testbed instance (down removes
        # it); the host's cgroup v2 root is visible as is in the node's mount namespace.
        "AMBIENT_EBPF_PIN_ROOT": info.get("bpf_pin_root")
        or f"/sys/fs/bpf/istio-cni-{info['node']}",
        "AMBIENT_ENABLED": "true",
        "CHAINED_CNI_PLUGIN": "true",
    }


def start_mesh(bed: Testbed, info: dict[str, Any], backend: str) -> dict[str, int]:
    """Start installer, agent and stand-in; returns name -> pid (recorded for ``down``)."""
    missing = missing_pieces()
    if missing:
        raise MeshUnavailable(
            "up --mesh needs pieces that have not landed yet: "
            + "; ".join(missing)
            + ". Bring the node up without --mesh, or land those first."
        )
    env = mesh_env(info, backend)
    launch = bed._launcher
    agent = [sys.executable, "-m", "node_agent.cli"]
    launch.start("istio-cni-install", [*agent, "install"], env=env)
    _wait_conflist(Path(info["cni_conflist"]).parent, launch, timeout=60.0)
    launch.start("istio-cni-agent", [*agent, "run"], env=env)
    _wait_agent_ready(bed, launch, timeout=60.0)
    start_standin(bed, info, env)
    rc = launch.exited().get("istio-cni-agent")
    if rc is not None:
        raise MeshUnavailable(f"istio-cni-agent exited {rc}:\n{launch.log_tail('istio-cni-agent')}")
    return {n: launch.pids[n] for n in ("istio-cni-install", "istio-cni-agent", "ztunnel-standin")}


def start_standin(bed: Testbed, info: dict[str, Any], env: dict[str, str]) -> int:
    """Start the ztunnel stand-in on the node (it connects to the agent's ZDS socket, which
    the agent, a host process or the istio-cni-node pod, serves); returns its pid."""
    launch = bed._launcher
    standin = [
        sys.executable, "-m", STANDIN_MODULE,
        f"--socket={info['ztunnel_socket_in_node']}",
        f"--access-log={info['ztunnel_access_log']}",
        f"--ca-dir={info['ztunnel_ca_dir']}",
        f"--kubeconfig={info['kubeconfig_node']}",  # HBONE to pods annotated enabled
    ]  # fmt: skip
    launch.start("ztunnel-standin", standin, env=env)
    time.sleep(1.0)  # a bad flag or import error shows within a second
    rc = launch.exited().get("ztunnel-standin")
    if rc is not None:
        raise MeshUnavailable(f"ztunnel-standin exited {rc}:\n{launch.log_tail('ztunnel-standin')}")
    return launch.pids["ztunnel-standin"]


def _wait_agent_ready(bed: Testbed, launch: Any, timeout: float) -> None:
    """Until the agent's ``/readyz`` (health port 8000 in the node netns) answers 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rc = launch.exited().get("istio-cni-agent")
        if rc is not None:
            raise MeshUnavailable(
                f"istio-cni-agent exited {rc}:\n{launch.log_tail('istio-cni-agent')}"
            )
        try:
            bed.node_http_get("127.0.0.1", HEALTH_PORT, "/readyz", timeout=1.0)
            return
        except Exception:  # not listening / not ready yet
            time.sleep(0.2)
    raise MeshUnavailable(
        f"istio-cni-agent not ready after {timeout}s:\n{launch.log_tail('istio-cni-agent')}"
    )


def _wait_conflist(conf_dir: Path, launch: Any, timeout: float) -> None:
    """Until a conflist in ``conf_dir`` chains an ``istio-cni`` entry (the installer ran)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for f in sorted(conf_dir.glob("*.conflist")):
            try:
                plugins = json.loads(f.read_text()).get("plugins", [])
            except (OSError, ValueError):
                continue
            if any(p.get("type") == "istio-cni" for p in plugins):
                return
        rc = launch.exited().get("istio-cni-install")
        if rc not in (None, 0):
            raise MeshUnavailable(
                f"istio-cni-agent install exited {rc}:\n{launch.log_tail('istio-cni-install')}"
            )
        time.sleep(0.2)
    raise MeshUnavailable(
        f"installer did not add istio-cni to a conflist in {conf_dir} in {timeout}s"
    )
