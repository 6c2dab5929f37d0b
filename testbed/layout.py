"""Where everything of one testbed node lives, and the configuration files it runs on.

Role: the single place that names paths, addresses and prefixes (so ``down`` can find all of
them again even after a crash) and renders the containerd, kubelet and CNI configuration.

Names: everything the testbed creates starts with ``icni-tb`` (``icnit-*`` belongs to the test
suite's own throwaway namespaces and is swept by it).

Inside the node's private mount namespace:
- ``/run`` (= ``/var/run``) and ``/var/lib`` are private tmpfs, so ``/var/run/netns/cni-*``
  (containerd's pod namespaces) exist only there; ``/var/lib/cni`` (libcni cache, host-local
  IPAM state), ``/var/log`` (pod logs), ``/var/run/istio-cni`` and ``/var/run/ztunnel`` are
  bound from ``state_dir`` and so are visible from the host as well;
- the CNI bin and conf dirs, kubelet's root and containerd's root are ordinary directories
  under ``state_dir``, at the same path from both sides.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "icni-tb"
STATE_DIR = Path(os.environ.get("ISTIO_CNI_TESTBED_DIR", "/var/tmp/icni-tb"))
DEFAULT_INSTANCE = "node"
CNI_PLUGINS_DIR = Path("/usr/lib/cni")
CGROUP_FS = Path("/sys/fs/cgroup")
BPF_FS = Path("/sys/fs/bpf")


@dataclass(frozen=True)
class Layout:
    """Paths, names and addresses of one node; pure data, derived from ``state_dir``."""

    state_dir: Path = STATE_DIR
    node_name: str = f"{PREFIX}-node"
    netns_name: str = f"{PREFIX}-node"
    node_ip: str = "10.77.0.2"
    node_prefix_len: int = 24
    node_if: str = "eth0"
    node_peer_if: str = f"{PREFIX}-peer"
    pod_cidr: str = "10.244.0.0/24"
    pod_gateway: str = "10.244.0.1"
    bridge: str = "cni0"
    service_cidr: str = "10.96.0.0/24"
    cgroup_root: str = f"/{PREFIX}"
    apiserver_port: int = 6443
    etcd_port: int = 2379
    network_name: str = f"{PREFIX}-net"
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def for_instance(cls, instance: str | None = None) -> Layout:
        """The layout of a named node. The default instance (``node``, or
        ``$ISTIO_CNI_TESTBED_INSTANCE``) is ``icni-tb-node`` in ``/var/tmp/icni-tb``; any
        other instance ``X`` is ``icni-tb-X`` in ``/var/tmp/icni-tb-X`` with cgroup root
        ``/icni-tb-X``, so several nodes (e.g. two engineers' test sessions) never collide."""
        inst = instance or os.environ.get("ISTIO_CNI_TESTBED_INSTANCE") or DEFAULT_INSTANCE
        if not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", inst):
            raise ValueError(f"testbed instance name {inst!r}: use 1-22 of [a-z0-9-]")
        if inst == DEFAULT_INSTANCE:
            return cls()
        name = f"{PREFIX}-{inst}"
        return cls(
            state_dir=STATE_DIR.with_name(f"{STATE_DIR.name}-{inst}"),
            node_name=name,
            netns_name=name,
            cgroup_root=f"/{name}",
        )

    @property
    def bpf_pin_root(self) -> Path:
        """The ebpf backend's pin root of this instance's agent, on the host's bpffs: private
        to the instance, so ``down`` removes exactly what this node's agents pinned (and the
        getsockopt link on the host cgroup root goes with its pin)."""
        return BPF_FS / f"istio-cni-{self.node_name}"

    @property
    def lock_file(self) -> Path:
        """Serialises ``up``/``down`` of this instance (beside, not inside, the state dir)."""
        return self.state_dir.with_name(self.state_dir.name + ".lock")

    # --- host-side paths -------------------------------------------------------------------
    @property
    def node_netns(self) -> Path:
        return Path("/run/netns") / self.netns_name

    @property
    def ns_dir(self) -> Path:
        """A private self-bind mount holding the mount-namespace file."""
        return self.state_dir / "ns"

    @property
    def mnt_ns(self) -> Path:
        return self.ns_dir / "mnt"

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def pids_file(self) -> Path:
        return self.state_dir / "pids.json"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def pki_dir(self) -> Path:
        return self.state_dir / "pki"

    @property
    def kubeconfig(self) -> Path:
        """Admin kubeconfig for the host (through the loopback forwarder)."""
        return self.state_dir / "kubeconfig"

    @property
    def kubeconfig_node(self) -> Path:
        """Admin kubeconfig for processes inside the node netns (``https://<node_ip>:6443``)."""
        return self.state_dir / "kubeconfig-node"

    @property
    def kubelet_kubeconfig(self) -> Path:
        return self.state_dir / "kubelet.kubeconfig"

    @property
    def cni_bin_dir(self) -> Path:
        return self.state_dir / "cni" / "bin"

    @property
    def cni_conf_dir(self) -> Path:
        return self.state_dir / "cni" / "net.d"

    @property
    def cni_conflist(self) -> Path:
        return self.cni_conf_dir / f"10-{PREFIX}.conflist"

    @property
    def var_lib_cni(self) -> Path:
        """Bound on the node's ``/var/lib/cni``: libcni cache + host-local IPAM state."""
        return self.state_dir / "var-lib-cni"

    @property
    def ipam_dir(self) -> Path:
        """host-local's reservations: one file per allocated pod IP (host-visible)."""
        return self.var_lib_cni / "networks" / self.network_name

    @property
    def var_log(self) -> Path:
        return self.state_dir / "var-log"

    @property
    def istio_cni_run(self) -> Path:
        """Bound on the node's ``/var/run/istio-cni`` (the agent's run dir)."""
        return self.state_dir / "istio-cni"

    @property
    def ztunnel_run(self) -> Path:
        """Bound on the node's ``/var/run/ztunnel``."""
        return self.state_dir / "ztunnel"

    @property
    def ztunnel_socket(self) -> Path:
        return self.ztunnel_run / "ztunnel.sock"

    @property
    def sysctl_dir(self) -> Path:
        return self.state_dir / "sysctl"

    @property
    def etcd_dir(self) -> Path:
        return self.state_dir / "etcd"

    @property
    def containerd_dir(self) -> Path:
        return self.state_dir / "containerd"

    @property
    def containerd_socket(self) -> Path:
        return self.containerd_dir / "containerd.sock"

    @property
    def kubelet_dir(self) -> Path:
        return self.state_dir / "kubelet"

    @property
    def forward_port_file(self) -> Path:
        return self.state_dir / "forward.port"

    # --- paths as seen inside the node's mount namespace -----------------------------------
    netns_dir_in_node: str = "/var/run/netns"
    istio_cni_run_in_node: str = "/var/run/istio-cni"
    ztunnel_socket_in_node: str = "/var/run/ztunnel/ztunnel.sock"

    def cgroup_dirs(self) -> list[Path]:
        """The cgroup root in every mounted hierarchy (v1 controllers and v2 ``unified``)."""
        out: list[Path] = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            sep = fields.index("-")
            fstype, mountpoint = fields[sep + 1], fields[4]
            if fstype in ("cgroup", "cgroup2") and mountpoint.startswith(str(CGROUP_FS)):
                out.append(Path(mountpoint) / self.cgroup_root.lstrip("/"))
        return out

    def api_server_in_node(self) -> str:
        return f"https://{self.node_ip}:{self.apiserver_port}"

    # --- configuration files ----------------------------------------------------------------
    def mount_script(self) -> str:
        """Shell run once inside the new mount namespace: the private mounts listed above."""
        binds = [
            (self.var_lib_cni, "/var/lib/cni"),
            (self.var_log, "/var/log"),
            (self.istio_cni_run, self.istio_cni_run_in_node),
            (self.ztunnel_run, "/var/run/ztunnel"),
        ]
        lines = [
            "set -e",
            "mount -t tmpfs -o mode=755 icni-tb-run /run",
            "mkdir -p /run/netns /run/lock",
            "mount -t tmpfs -o mode=755 icni-tb-varlib /var/lib",
        ]
        for src, dst in binds:
            lines += [f"mkdir -p {dst}", f"mount --bind {src} {dst}"]
        for name in self.sysctls():
            f = self.sysctl_dir / name
            lines.append(f"mount --bind {f} /proc/sys/{name.replace('.', '/')}")
        return "\n".join(lines) + "\n"

    @staticmethod
    def sysctls() -> dict[str, str]:
        """What kubelet insists on; served from files in the node's mount ns only."""
        return {"vm.overcommit_memory": "1", "kernel.panic": "10", "kernel.panic_on_oops": "1"}

    def cni_conflist_json(self) -> str:
        conf = {
            "cniVersion": "1.0.0",
            "name": self.network_name,
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": self.bridge,
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": self.pod_cidr, "gateway": self.pod_gateway}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }
        return json.dumps(conf, indent=2) + "\n"

    def containerd_toml(self, sandbox_image: str) -> str:
        d = self.containerd_dir
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        return f"""version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.overlayfs"]

[grpc]
  address = "{self.containerd_socket}"

[ttrpc]
  address = "{d}/containerd.ttrpc.sock"

[{cri}]
  sandbox_image = "{sandbox_image}"
  enable_selinux = false
  # This machine's root lacks CAP_SYS_RESOURCE: a negative oom_score_adj (pause wants -998)
  # is refused and runc fails with "can't get final child's PID from pipe". Clamp instead.
  restrict_oom_score_adj = true
  [{cri}.containerd]
    snapshotter = "native"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        SystemdCgroup = false
  [{cri}.cni]
    bin_dir = "{self.cni_bin_dir}"
    conf_dir = "{self.cni_conf_dir}"
    max_conf_num = 1
"""

    def kubelet_config_json(self, minor: int = 99) -> str:
        """KubeletConfiguration for a kubelet of 1.``minor``."""
        conf: dict[str, object] = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": self.cgroup_root,
            "failSwapOn": False,
            "oomScoreAdj": 0,  # no CAP_SYS_RESOURCE here: cannot go below 0
            "address": self.node_ip,
            "port": 10250,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": 10248,
            "authentication": {
                "anonymous": {"enabled": True},
                "webhook": {"enabled": False},
            },
            "authorization": {"mode": "AlwaysAllow"},
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "nodefs.inodesFree": "1%",
                "imagefs.available": "1%",
            },
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "nodeStatusUpdateFrequency": "1s",
            "nodeStatusReportFrequency": "10s",
            "syncFrequency": "10s",
            "serializeImagePulls": False,
            "clusterDomain": "cluster.local",
            "resolvConf": "/etc/resolv.conf",
            "volumePluginDir": str(self.kubelet_dir / "volume-plugins"),
        }
        if minor >= 31:
            # This machine mounts cgroup v1 controllers (v2 only at .../unified); kubelet >= 1.35
            # refuses that by default. Pods' cgroups stay v1, as the docs describe.
            conf["failCgroupV1"] = False
        return json.dumps(conf, indent=2) + "\n"
