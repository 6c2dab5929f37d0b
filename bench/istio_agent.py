"""Istio's own node agent (``install-cni``, built by :mod:`bench.istio_peer`) run on this
machine the way its DaemonSet runs it, for the side-by-side agent benchmarks.

Role: start ``install-cni`` as a host process inside a container-like root: a private mount
namespace (``unshare -m``) where a scratch root holds the machine's ``/usr``, ``/etc``,
``/dev``, ``/sys`` and ``/proc`` (bind mounts) plus exactly the chart's volumes:
``/host/proc``, ``/host/var/run/netns`` (the pods' namespaces), ``/host/opt/cni/bin`` and
``/host/etc/cni/net.d`` (scratch dirs, never the machine's), ``/var/run/istio-cni``,
``/var/run/ztunnel``, the service-account token dir, and ``/opt/cni/bin/istio-cni`` as in
Istio's image; then ``chroot`` and exec. Its environment is the chart's ConfigMap with the
chart's default values and the DaemonSet's own env (``install_env``).

Invariants:
- The process lives in ``netns`` (a node namespace that reaches the API server), never the
  machine's own: Istio's agent writes its host probe rules into its own namespace (the chart's
  ``ambient.shareHostNetworkNamespace: true`` form, hostNetwork; the newest default runs the
  pod in its own namespace and switches via ``/host/proc/1/ns/net``, which cannot be read
  here: see /work/shared/TESTBED.md).
- The mount namespace dies with the process; the scratch dirs are the caller's to remove.
- The returned process is ``install-cni`` itself (every step execs), so its pid's RSS and
  CPU are the agent's own.
"""

from __future__ import annotations

import base64
import shlex
import subprocess
from pathlib import Path

import yaml

from bench.istio_peer import PeerBinaries

# values.yaml `ambient.enablementSelectors` default, as the ConfigMap renders it (toYaml).
ENABLEMENT_SELECTOR = """\
- podSelector:
    matchLabels:
      istio.io/dataplane-mode: ambient
- namespaceSelector:
    matchLabels:
      istio.io/dataplane-mode: ambient
  podSelector:
    matchExpressions:
    - key: istio.io/dataplane-mode
      operator: NotIn
      values:
      - none
"""
PRIMARY_CONFLIST = {
    "cniVersion": "1.0.0",
    "name": "k8s-pod-network",
    "plugins": [{"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}}],
}


def install_env(node_name: str, api_host: str, api_port: int) -> dict[str, str]:
    """The ConfigMap (chart defaults) plus the DaemonSet's env for ``node_name`` (pure)."""
    return {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "CURRENT_AGENT_VERSION": "bench",
        "AMBIENT_ENABLED": "true",
        "AMBIENT_ENABLEMENT_SELECTOR": ENABLEMENT_SELECTOR,
        "AMBIENT_DNS_CAPTURE": "true",
        "AMBIENT_IPV6": "true",
        "AMBIENT_RECONCILE_POD_RULES_ON_STARTUP": "true",  # the chart's reconcileIptablesOnStartup
        "ENABLE_AMBIENT_DETECTION_RETRY": "false",
        "ISTIO_OWNED_CNI_CONFIG": "false",
        "CHAINED_CNI_PLUGIN": "true",
        "EXCLUDE_NAMESPACES": "kube-system",
        "REPAIR_ENABLED": "true",
        "REPAIR_LABEL_PODS": "false",
        "REPAIR_DELETE_PODS": "false",
        "REPAIR_REPAIR_PODS": "true",
        "REPAIR_INIT_CONTAINER_NAME": "istio-validation",
        "REPAIR_BROKEN_POD_LABEL_KEY": "cni.istio.io/uninitialized",
        "REPAIR_BROKEN_POD_LABEL_VALUE": "true",
        "NATIVE_NFTABLES": "false",
        "REPAIR_NODE_NAME": node_name,
        "REPAIR_RUN_AS_DAEMON": "true",
        "REPAIR_SIDECAR_ANNOTATION": "sidecar.istio.io/status",
        "NODE_NAME": node_name,
        "GOMAXPROCS": "2",  # limits.cpu unset: the node's cores
        "POD_NAME": "istio-cni-node-bench",
        "POD_NAMESPACE": "istio-system",
        "KUBERNETES_SERVICE_HOST": api_host,
        "KUBERNETES_SERVICE_PORT": str(api_port),
    }


def service_account_from_kubeconfig(kubeconfig: Path) -> tuple[str, bytes, str, int]:
    """(token, CA PEM, API host, API port) of a token kubeconfig's current context."""
    doc = yaml.safe_load(kubeconfig.read_text())
    cluster = doc["clusters"][0]["cluster"]
    user = doc["users"][0]["user"]
    if "certificate-authority-data" in cluster:
        ca = base64.b64decode(cluster["certificate-authority-data"])
    else:
        ca = Path(cluster["certificate-authority"]).read_bytes()
    hostport = str(cluster["server"]).removeprefix("https://").rstrip("/")
    host, _, port = hostport.rpartition(":")
    return str(user["token"]), ca, host, int(port)


# (where in the root, what on the host: a key of the scratch dirs or an absolute path, rbind?)
_MOUNTS: list[tuple[str, str, bool]] = [
    ("usr", "/usr", False),
    ("etc", "/etc", False),
    ("dev", "/dev", True),
    ("sys", "/sys", True),
    ("proc", "/proc", False),
    ("host/proc", "/proc", False),
    ("host/var/run/netns", "/run/netns", True),
    ("host/opt/cni/bin", "cni-bin", False),
    ("host/etc/cni/net.d", "net.d", False),
    ("run/istio-cni", "run", False),
    ("run/ztunnel", "zt", False),
    ("run/secrets/kubernetes.io/serviceaccount", "sa", False),
]


def prepare(scratch: Path, kubeconfig_in_node: Path) -> None:
    """Lay out ``scratch``: the root's mount points and the scratch volumes (no mounts)."""
    import json

    root = scratch / "root"
    for rel, _src, _r in _MOUNTS:
        (root / rel).mkdir(parents=True, exist_ok=True)
    for link, target in (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"),
                         ("lib64", "usr/lib64")):  # fmt: skip
        if not (root / link).is_symlink():
            (root / link).symlink_to(target)
    (root / "var").mkdir(exist_ok=True)
    if not (root / "var" / "run").is_symlink():
        (root / "var" / "run").symlink_to("../run")
    (root / "tmp").mkdir(exist_ok=True)
    (root / "opt" / "cni" / "bin").mkdir(parents=True, exist_ok=True)
    (root / "opt" / "cni" / "bin" / "istio-cni").touch()
    (root / "istio").mkdir(exist_ok=True)
    (root / "istio" / "install-cni").touch()
    for d in ("cni-bin", "net.d", "run", "zt", "sa"):
        (scratch / d).mkdir(exist_ok=True)
    (scratch / "net.d" / "10-bridge.conflist").write_text(json.dumps(PRIMARY_CONFLIST))
    token, ca, _host, _port = service_account_from_kubeconfig(kubeconfig_in_node)
    (scratch / "sa" / "token").write_text(token)
    (scratch / "sa" / "ca.crt").write_bytes(ca)
    (scratch / "sa" / "namespace").write_text("istio-system")


def mount_script(
    scratch: Path,
    peer: PeerBinaries,
    volumes: dict[str, str] | None = None,
    own_pid_namespace: bool = False,
    host_proc: dict[str, int] | None = None,
) -> str:
    """The shell run inside the new mount namespace: bind everything, chroot, exec (pure).

    ``volumes`` replaces scratch volumes by real node paths (keys ``cni-bin``, ``net.d``,
    ``run``, ``zt``, ``/run/netns``: the testbed node's own dirs, for the agent swap).
    ``own_pid_namespace``: the agent runs as pid 1 of a pid namespace of its own, its
    ``/proc`` that namespace's (it reads ``/proc/1/ns/net`` at start, which this machine
    forbids for the real pid 1) while ``/host/proc`` stays the node's; its host pid is the
    only child of the returned process, which dies with it.

    ``host_proc`` (name -> host pid): ``/host/proc`` holds only these process dirs, bound
    from the host's ``/proc``; Istio's pod finder stats ``/host/proc/1/ns/net`` as the host
    namespace, which this machine forbids for the real pid 1, so ``"1"`` names a process
    of the node's namespace instead. Processes started later are not in it."""
    volumes = volumes or {}
    root = scratch / "root"
    # The root is a mount point of its own, as a container's is (Istio's iptables runs in a
    # mount namespace of its own and remounts / private first).
    lines = [
        "set -e",
        # Slave, not private: pod namespaces mounted on the host later still appear under
        # /host/var/run/netns (the chart's mountPropagation: HostToContainer); nothing leaks out.
        "mount --make-rslave /",
        f"mount --bind {shlex.quote(str(root))} {shlex.quote(str(root))}",
    ]
    for rel, src, rbind in _MOUNTS:
        if own_pid_namespace and rel == "proc":
            continue  # mounted by unshare below
        if host_proc is not None and rel == "host/proc":
            where = shlex.quote(str(root / rel))
            lines.append(f"mount -t tmpfs tmpfs {where}")
            for name, pid in sorted(host_proc.items()):
                # A process gone meanwhile (a probe's exec) is simply left out.
                d = f"{where}/{name}"
                lines.append(f"mkdir {d} && {{ mount --bind /proc/{pid} {d} || rmdir {d}; }}")
            continue
        src = volumes.get(src, src)
        host = src if src.startswith("/") else str(scratch / src)
        flag = "--rbind" if rbind else "--bind"
        lines.append(f"mount {flag} {shlex.quote(host)} {shlex.quote(str(root / rel))}")
    lines.append(
        f"mount --bind {shlex.quote(str(peer.path('istio-cni')))} "
        f"{shlex.quote(str(root / 'opt/cni/bin/istio-cni'))}"
    )
    lines.append(
        f"mount --bind {shlex.quote(str(peer.path('install-cni')))} "
        f"{shlex.quote(str(root / 'istio/install-cni'))}"
    )
    lines.append(f"mount -t tmpfs tmpfs {shlex.quote(str(root / 'tmp'))}")
    run = f"chroot {shlex.quote(str(root))} /istio/install-cni --log_output_level=info"
    if own_pid_namespace:
        proc = shlex.quote(str(root / "proc"))
        # Slave, as above: pod namespaces mounted later must still show under /host.
        run = (
            f"unshare -p --fork --kill-child=SIGTERM --propagation slave --mount-proc={proc} {run}"
        )
    lines.append(f"exec {run}")
    return "\n".join(lines)


def start_istio_agent(
    scratch: Path,
    peer: PeerBinaries,
    *,
    node_name: str,
    netns: str,
    kubeconfig_in_node: Path,
) -> subprocess.Popen[bytes]:
    """Istio's agent for ``node_name`` in ``netns``; its ztunnel socket is
    ``scratch/zt/ztunnel.sock``, its plugin socket dir ``scratch/run``, its log
    ``scratch/istio-agent.log``. The caller terminates it and removes ``scratch``."""
    prepare(scratch, kubeconfig_in_node)
    _token, _ca, host, port = service_account_from_kubeconfig(kubeconfig_in_node)
    argv = [
        "nsenter",
        f"--net={netns}",
        "unshare",
        "-m",
        "--propagation",
        "unchanged",
        "sh",
        "-c",
        mount_script(scratch, peer),
    ]
    with open(scratch / "istio-agent.log", "ab") as log:
        return subprocess.Popen(
            argv, env=install_env(node_name, host, port), stdout=log, stderr=subprocess.STDOUT
        )
