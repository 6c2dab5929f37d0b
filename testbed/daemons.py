"""The node's long-running processes: how each is started, and inside which namespaces.

Role: argv for etcd, kube-apiserver, containerd, kube-controller-manager, kube-scheduler and
kubelet (pure functions of the layout), and :class:`Launcher`, which starts a process inside
the node's network + mount namespaces through ``nsenter`` (never ``ip netns exec``: it
remounts ``/sys`` and hides the cgroup mounts containerd and runc need), detached in its own
session, logging to ``<state_dir>/logs/<name>.log``.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from testbed.build import KubeBinaries
from testbed.layout import Layout
from testbed.pki import Pki


def nsenter_prefix(layout: Layout) -> list[str]:
    """Prefix that runs a command in the node's network and mount namespaces."""
    return ["nsenter", f"--net={layout.node_netns}", f"--mount={layout.mnt_ns}", "--"]


class Launcher:
    """Starts detached processes and remembers their pids (name -> pid)."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.pids: dict[str, int] = {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(
        self, name: str, argv: list[str], *, in_node: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        self.layout.logs_dir.mkdir(parents=True, exist_ok=True)
        full = [*nsenter_prefix(self.layout), *argv] if in_node else argv
        with open(self.layout.logs_dir / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                full,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.layout.state_dir,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        self.pids[name] = proc.pid
        self.procs[name] = proc
        # Recorded at once, so `down` finds it even if this process dies during `up`.
        tmp = self.layout.pids_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.pids))
        tmp.rename(self.layout.pids_file)
        return proc

    def exited(self) -> dict[str, int]:
        """name -> exit code of every started process that has already exited."""
        return {n: rc for n, p in self.procs.items() if (rc := p.poll()) is not None}

    def log_tail(self, name: str, lines: int = 15) -> str:
        try:
            text = (self.layout.logs_dir / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _legacy(bins: KubeBinaries) -> bool:
    """The Debian 1.20 set (comparisons only): flags removed since then are still needed."""
    return bins.minor < 24


def etcd_argv(layout: Layout, bins: KubeBinaries) -> list[str]:
    url = f"http://127.0.0.1:{layout.etcd_port}"
    return [
        bins.etcd,
        "--name=icni-tb",
        f"--data-dir={layout.etcd_dir}",
        f"--listen-client-urls={url}",
        f"--advertise-client-urls={url}",
        f"--listen-peer-urls=http://127.0.0.1:{layout.etcd_port + 1}",
        f"--initial-advertise-peer-urls=http://127.0.0.1:{layout.etcd_port + 1}",
        f"--initial-cluster=icni-tb=http://127.0.0.1:{layout.etcd_port + 1}",
        "--log-level=warn",
        "--quota-backend-bytes=268435456",
    ]


def apiserver_argv(layout: Layout, bins: KubeBinaries, pki: Pki) -> list[str]:
    return [
        str(bins.path("kube-apiserver")),
        f"--etcd-servers=http://127.0.0.1:{layout.etcd_port}",
        "--bind-address=0.0.0.0",
        f"--secure-port={layout.apiserver_port}",
        *(["--insecure-port=0"] if _legacy(bins) else []),
        f"--advertise-address={layout.node_ip}",
        f"--tls-cert-file={pki.server_cert}",
        f"--tls-private-key-file={pki.server_key}",
        f"--client-ca-file={pki.ca_cert}",
        f"--token-auth-file={pki.token_file}",
        "--authorization-mode=Node,RBAC",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-account-key-file={pki.sa_pub}",
        f"--service-account-signing-key-file={pki.sa_key}",
        f"--service-cluster-ip-range={layout.service_cidr}",
        "--allow-privileged=true",
        "--kubelet-preferred-address-types=InternalIP",
        "--enable-priority-and-fairness=false",
        "--profiling=false",
        "--v=1",
    ]


def controller_manager_argv(layout: Layout, bins: KubeBinaries, pki: Pki) -> list[str]:
    return [
        str(bins.path("kube-controller-manager")),
        f"--kubeconfig={layout.kubeconfig_node}",
        "--leader-elect=false",
        f"--service-account-private-key-file={pki.sa_key}",
        f"--root-ca-file={pki.ca_cert}",
        "--bind-address=127.0.0.1",
        *(["--port=0"] if _legacy(bins) else []),
        "--controllers=*,-nodeipam,-cloud-node-lifecycle,-service,-route",
        "--node-monitor-grace-period=40s",
        "--profiling=false",
        "--v=1",
    ]


def scheduler_argv(layout: Layout, bins: KubeBinaries) -> list[str]:
    return [
        str(bins.path("kube-scheduler")),
        f"--kubeconfig={layout.kubeconfig_node}",
        "--leader-elect=false",
        "--bind-address=127.0.0.1",
        *(["--port=0"] if _legacy(bins) else []),
        "--profiling=false",
        "--v=1",
    ]


def containerd_argv(layout: Layout, bins: KubeBinaries) -> list[str]:
    return [bins.containerd, f"--config={layout.containerd_dir / 'config.toml'}"]


def kubelet_argv(layout: Layout, bins: KubeBinaries, pause_ref: str) -> list[str]:
    return [
        str(bins.path("kubelet")),
        f"--config={layout.kubelet_dir / 'config.json'}",
        f"--kubeconfig={layout.kubelet_kubeconfig}",
        *(["--container-runtime=remote"] if _legacy(bins) else []),
        f"--container-runtime-endpoint=unix://{layout.containerd_socket}",
        f"--root-dir={layout.kubelet_dir / 'root'}",
        f"--cert-dir={layout.kubelet_dir / 'pki'}",
        f"--hostname-override={layout.node_name}",
        f"--node-ip={layout.node_ip}",
        # Removed in 1.35 (the sandbox image is containerd's `sandbox_image` anyway).
        *([f"--pod-infra-container-image={pause_ref}"] if _legacy(bins) else []),
        "--v=1",
    ]


def ctr_argv(layout: Layout, bins: KubeBinaries, *args: str) -> list[str]:
    return [bins.ctr, f"--address={layout.containerd_socket}", "--namespace=k8s.io", *args]


def log_path(layout: Layout, name: str) -> Path:
    return layout.logs_dir / f"{name}.log"
