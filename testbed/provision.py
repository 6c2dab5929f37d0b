"""Provision one node on the host: its files, namespaces and cgroup root (nothing runs yet).

Role: the first half of ``up``, as three steps each undone by :mod:`testbed.cleanup`:
``write_files`` (everything under the state dir), ``make_namespaces`` (node netns + a
persistent private mount namespace, pinned by a bind mount on a privately mounted dir),
``make_cgroups``. Nothing is added to the host's network namespace.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence

from testbed.images import Image
from testbed.layout import CNI_PLUGINS_DIR, Layout
from testbed.pki import Pki, kubeconfig, make_pki


class ProvisionError(RuntimeError):
    """A host command failed while provisioning; the message carries its stderr."""


def _run(argv: Sequence[str]) -> None:
    proc = subprocess.run(list(argv), capture_output=True, text=True)
    if proc.returncode != 0:
        raise ProvisionError(
            f"{' '.join(argv)} failed: {proc.stderr.strip() or proc.stdout.strip()}"
        )


def write_files(lay: Layout, images: dict[str, Image], kube_minor: int) -> Pki:
    """Directories, PKI, kubeconfigs, CNI plugins + conflist, daemon configs, sysctl files."""
    for d in (
        lay.state_dir,
        lay.logs_dir,
        lay.cni_bin_dir,
        lay.cni_conf_dir,
        lay.var_lib_cni,
        lay.var_log,
        lay.istio_cni_run,
        lay.ztunnel_run,
        lay.sysctl_dir,
        lay.etcd_dir,
        lay.containerd_dir,
        lay.kubelet_dir,
        lay.ns_dir,
    ):
        d.mkdir(parents=True, exist_ok=True)
    lay.etcd_dir.chmod(0o700)
    pki = make_pki(
        lay.pki_dir,
        lay.node_name,
        [lay.node_ip, "127.0.0.1", "10.96.0.1"],
        [
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ],
    )
    lay.kubeconfig_node.write_text(
        kubeconfig(lay.api_server_in_node(), pki.ca_cert, pki.admin_token, "admin")
    )
    lay.kubelet_kubeconfig.write_text(
        kubeconfig(
            lay.api_server_in_node(),
            pki.ca_cert,
            pki.node_token,
            f"system:node:{lay.node_name}",
        )
    )
    for plugin in sorted(CNI_PLUGINS_DIR.iterdir()):
        shutil.copy2(plugin, lay.cni_bin_dir / plugin.name)
    lay.cni_conflist.write_text(lay.cni_conflist_json())
    (lay.containerd_dir / "config.toml").write_text(lay.containerd_toml(images["pause"].ref))
    (lay.kubelet_dir / "config.json").write_text(lay.kubelet_config_json(kube_minor))
    for name, value in lay.sysctls().items():
        (lay.sysctl_dir / name).write_text(value + "\n")
    return pki


def make_namespaces(lay: Layout) -> None:
    """The node netns (loopback + a veth carrying the node IP, no default route) and the
    persistent private mount namespace with the mounts of :meth:`Layout.mount_script`."""
    _run(["mount", "--bind", str(lay.ns_dir), str(lay.ns_dir)])
    _run(["mount", "--make-private", str(lay.ns_dir)])
    lay.mnt_ns.touch()
    _run(["ip", "netns", "add", lay.netns_name])
    n = ["ip", "-n", lay.netns_name]
    _run([*n, "link", "set", "lo", "up"])
    _run([*n, "link", "add", lay.node_if, "type", "veth", "peer", "name", lay.node_peer_if])
    _run([*n, "addr", "add", f"{lay.node_ip}/{lay.node_prefix_len}", "dev", lay.node_if])
    _run([*n, "link", "set", lay.node_if, "up"])
    _run([*n, "link", "set", lay.node_peer_if, "up"])
    _run(
        [
            "unshare",
            f"--mount={lay.mnt_ns}",
            "--propagation",
            "private",
            "sh",
            "-c",
            lay.mount_script(),
        ]
    )


def make_cgroups(lay: Layout) -> None:
    """The cgroup root in every hierarchy (kubelet's ``cgroupRoot``)."""
    for d in lay.cgroup_dirs():
        d.mkdir(exist_ok=True)
        for f in ("cpuset.cpus", "cpuset.mems"):  # a v1 cpuset child starts empty
            if (d / f).exists() and not (d / f).read_text().strip():
                (d / f).write_text((d.parent / f).read_text())
