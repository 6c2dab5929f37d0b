"""One real single-node Kubernetes on this machine: :class:`Testbed`.

Role: the composition root of the testbed. ``up()`` builds (or reuses) the binaries and
images, creates the node's network + mount namespaces and cgroup root, starts etcd,
kube-apiserver, containerd, kube-controller-manager, kube-scheduler and kubelet inside them,
waits until the node is Ready, and returns the info dict that ``istio-cni-testbed up`` prints.
``down()`` removes all of it (see :mod:`testbed.cleanup`); ``up()`` first cleans up after a
crashed run. Helpers run commands "on the node" (``node_exec``) and build kube clients.

Invariants: nothing is added to the host's network namespace (the API server is reached
from the host through a loopback forwarder); every process, mount, cgroup and file made is
found again by ``down`` from well-known names, even without the state file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from testbed import cleanup, daemons, provision
from testbed.build import CACHE_DIR, KubeBinaries, ensure_binaries
from testbed.images import Image, build_images
from testbed.layout import Layout
from testbed.pki import kubeconfig

BACKENDS = ("iptables", "nftables", "ebpf")
_FORBIDDEN_STATE_PARENTS = ("/run", "/var/run", "/var/lib", "/var/log")


class TestbedError(RuntimeError):
    """The node could not be brought up or down; the message says what and what to do."""

    __test__ = False  # not a pytest test class despite the name


def _log(msg: str) -> None:
    print(f"testbed: {msg}", file=sys.stderr, flush=True)


def _run(argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise TestbedError(f"{' '.join(argv)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


class Testbed:
    """A single-node Kubernetes; ``up``/``down`` are idempotent and crash-safe."""

    __test__ = False

    def __init__(
        self,
        layout: Layout | None = None,
        cache: Path = CACHE_DIR,
        kubernetes_version: str | None = None,
        apiserver_flags: Sequence[str] = (),
    ) -> None:
        self.layout = layout or Layout.for_instance()
        self.cache = cache
        # None: ISTIO_CNI_TESTBED_KUBERNETES or the default release (testbed.build).
        self.kubernetes_version = kubernetes_version
        # Extra kube-apiserver flags (e.g. --feature-gates=WatchList=false for a test).
        self.apiserver_flags = list(apiserver_flags)
        self._launcher = daemons.Launcher(self.layout)
        self.timings: dict[str, float] = {}

    # --- public API -------------------------------------------------------------------------
    def up(
        self,
        mesh: bool = False,
        backend: str = "iptables",
        timeout: float = 180.0,
        replace: bool = False,
    ) -> dict[str, Any]:
        """Bring the node up and return :meth:`info`. Leftovers of a crashed run are cleaned
        first; a node of this instance that is still running is an error unless ``replace``
        (someone else may be using it). ``timeout`` counts from after the (cached) build."""
        if backend not in BACKENDS:
            raise TestbedError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
        if os.geteuid() != 0:
            raise TestbedError("the testbed needs root (namespaces, mounts, cgroups): use sudo")
        for parent in _FORBIDDEN_STATE_PARENTS:
            if str(self.layout.state_dir).startswith(parent + "/"):
                raise TestbedError(
                    f"state dir {self.layout.state_dir} is under {parent}, which the node's "
                    "mount namespace hides: set ISTIO_CNI_TESTBED_DIR elsewhere "
                    "(default /var/tmp/icni-tb)"
                )
        bins = ensure_binaries(self.cache, self.kubernetes_version)
        images = build_images(self.cache / "images")
        with self._locked():
            if self.running() and not replace:
                raise TestbedError(
                    f"testbed {self.layout.node_name} is already running (maybe someone else's): "
                    "`istio-cni-testbed down` first, use `up --replace`, or pick another "
                    "instance with ISTIO_CNI_TESTBED_INSTANCE=<name>"
                )
            started = time.monotonic()
            if cleanup.leftovers(self.layout):
                _log("cleaning up after a previous run")
                self._teardown_or_raise()
            try:
                info = self._up(bins, images, mesh, backend, started + timeout)
            except BaseException:
                _log(f"up failed; logs were in {self.layout.logs_dir}, tearing down")
                self._dump_failed_logs()
                cleanup.teardown(self.layout)
                raise
        _log(f"node {self.layout.node_name} Ready in {time.monotonic() - started:.1f}s")
        return info

    def down(self) -> list[str]:
        """Remove everything; returns what could not be removed (empty list = clean)."""
        started = time.monotonic()
        with self._locked():
            problems = cleanup.teardown(self.layout)
            self.layout.lock_file.unlink(missing_ok=True)
        _log(
            f"down in {time.monotonic() - started:.1f}s"
            + (f"; problems: {problems}" if problems else "")
        )
        return problems

    def running(self) -> bool:
        """True when this instance's state file exists and every recorded daemon is alive."""
        try:
            pids = self.info().get("pids", {})
        except TestbedError:
            return False
        return bool(pids) and all(cleanup.alive(int(p)) for p in pids.values())

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.layout.lock_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.layout.lock_file, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                _log(f"waiting for another up/down of {self.layout.node_name} to finish")
                fcntl.flock(f, fcntl.LOCK_EX)
            yield

    def info(self) -> dict[str, Any]:
        """The info dict of the running node (from its state file)."""
        try:
            data: dict[str, Any] = json.loads(self.layout.state_file.read_text())
        except (OSError, ValueError) as e:
            raise TestbedError(f"no running testbed ({e}); run `istio-cni-testbed up`") from e
        return data

    def status(self) -> dict[str, Any]:
        """What is running: each recorded daemon's liveness, node readiness, leftovers."""
        left = cleanup.leftovers(self.layout)
        try:
            info = self.info()
        except TestbedError:
            return {"running": False, "leftovers": left}
        procs = {n: Path(f"/proc/{p}").exists() for n, p in info.get("pids", {}).items()}
        ready: bool | str
        try:
            ready = self._node_ready()
        except Exception as e:  # any failure to ask means "unknown", reported as such
            ready = f"unknown: {e}"
        return {
            "running": all(procs.values()),
            "processes": procs,
            "node_ready": ready,
            "info": info,
        }

    def node_exec(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        input: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the node's network + mount namespaces (as a node process would)."""
        proc = subprocess.run(
            [*daemons.nsenter_prefix(self.layout), *argv],
            capture_output=True,
            text=True,
            input=input,
            env={**os.environ, **(env or {})},
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise TestbedError(
                f"on node: {' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}"
            )
        return proc

    def node_http_get(self, host: str, port: int, path: str = "/", timeout: float = 5.0) -> str:
        """HTTP/1.0 GET from the node's network namespace (where kubelet probes come from);
        returns the body, raises :class:`TestbedError` on a non-200 status."""
        from cni_plugin.netns import run_in_netns

        def get() -> bytes:
            with socket.create_connection((host, port), timeout=timeout) as s:
                s.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
                chunks = []
                while data := s.recv(65536):
                    chunks.append(data)
            return b"".join(chunks)

        raw = run_in_netns(str(self.layout.node_netns), get)
        head, _, body = raw.partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0].decode(errors="replace")
        if " 200 " not in status + " ":
            raise TestbedError(f"GET http://{host}:{port}{path} from the node: {status}")
        return body.decode(errors="replace")

    def node_popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in the node's namespaces; ``down`` kills it if the caller doesn't."""
        return subprocess.Popen([*daemons.nsenter_prefix(self.layout), *argv], **kw)

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """``kubectl --kubeconfig <host kubeconfig> args...`` from the host."""
        proc = subprocess.run(
            [self._kubectl_path(), f"--kubeconfig={self.layout.kubeconfig}", *args],
            capture_output=True,
            text=True,
            input=input,
            timeout=120,
        )
        if check and proc.returncode != 0:
            raise TestbedError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc

    def _kubectl_path(self) -> str:
        """The kubectl built with the node (same version), else whatever is on PATH."""
        try:
            return str(self.info()["kubectl"])
        except (TestbedError, KeyError):
            return "kubectl"

    def kube_client(self) -> Any:
        """A ``kubernetes.client.ApiClient`` for the host kubeconfig (admin)."""
        from kubernetes import config

        path = str(self.layout.kubeconfig)
        return config.new_client_from_config(config_file=path)  # type: ignore[no-untyped-call]

    # --- bring-up ---------------------------------------------------------------------------
    def _up(
        self,
        bins: KubeBinaries,
        images: dict[str, Image],
        mesh: bool,
        backend: str,
        deadline: float,
    ) -> dict[str, Any]:
        lay = self.layout
        pki = provision.write_files(lay, images, bins.minor)
        provision.make_namespaces(lay)
        provision.make_cgroups(lay)
        launch = self._launcher
        launch.start(
            "forward",
            [
                sys.executable,
                "-m",
                "testbed.forward",
                f"--netns={lay.node_netns}",
                f"--target={lay.node_ip}:{lay.apiserver_port}",
                f"--port-file={lay.forward_port_file}",
            ],
            in_node=False,
        )
        launch.start("etcd", daemons.etcd_argv(lay, bins))
        launch.start("containerd", daemons.containerd_argv(lay, bins))
        port = int(str(self._wait("loopback forwarder", deadline, self._forward_port)))
        server = f"https://127.0.0.1:{port}"
        lay.kubeconfig.write_text(kubeconfig(server, pki.ca_cert, pki.admin_token, "admin"))
        apiserver = [*daemons.apiserver_argv(lay, bins, pki), *self.apiserver_flags]
        launch.start("kube-apiserver", apiserver)
        self._wait("containerd", deadline, lambda: lay.containerd_socket.exists())
        for image in images.values():
            _run(
                daemons.ctr_argv(
                    lay, bins, "images", "import", "--snapshotter=native", str(image.tarball)
                )
            )
        self._wait("kube-apiserver /readyz", deadline, self._apiserver_ready)
        launch.start("kube-controller-manager", daemons.controller_manager_argv(lay, bins, pki))
        launch.start("kube-scheduler", daemons.scheduler_argv(lay, bins))
        launch.start("kubelet", daemons.kubelet_argv(lay, bins, images["pause"].ref))
        self._wait("node Ready", deadline, self._node_ready)
        self._wait("default service account", deadline, self._default_sa)
        info = self._info(bins, images, server, backend, mesh)
        self._save(info)
        if mesh:
            from testbed.mesh import start_mesh

            info["mesh_pids"] = start_mesh(self, info, backend)
            info["pids"].update(info["mesh_pids"])
            self._save(info)
        return info

    def _wait(self, what: str, deadline: float, probe: Callable[[], object]) -> object:
        started = time.monotonic()
        last_note = started
        while True:
            try:
                result = probe()
            except Exception:  # probes raise while the thing is still starting
                result = None
            if result:
                self.timings[what] = round(time.monotonic() - started, 2)
                _log(f"{what}: ok after {time.monotonic() - started:.1f}s")
                return result
            dead = self._launcher.exited()
            if dead:
                name = next(iter(dead))
                raise TestbedError(
                    f"{name} exited ({dead[name]}) while waiting for {what}:\n"
                    f"{self._launcher.log_tail(name)}"
                )
            now = time.monotonic()
            if now > deadline:
                raise TestbedError(f"timed out waiting for {what}; see {self.layout.logs_dir}")
            if now - last_note > 15:
                _log(f"still waiting for {what} ({now - started:.0f}s)")
                last_note = now
            time.sleep(0.2)

    def _forward_port(self) -> str | None:
        f = self.layout.forward_port_file
        return f.read_text().strip() if f.exists() else None

    def _api_get(self, path: str) -> Any:
        import ssl

        cfg = json.loads(self.layout.kubeconfig.read_text())
        ctx = ssl.create_default_context(
            cafile=cfg["clusters"][0]["cluster"]["certificate-authority"]
        )
        req = urllib.request.Request(
            cfg["clusters"][0]["cluster"]["server"] + path,
            headers={"Authorization": "Bearer " + cfg["users"][0]["user"]["token"]},
        )
        with urllib.request.urlopen(req, context=ctx, timeout=5) as resp:
            body = resp.read().decode()
        return json.loads(body) if body.startswith("{") else body

    def _apiserver_ready(self) -> bool:
        return bool(self._api_get("/readyz") == "ok")

    def _node_ready(self) -> bool:
        node = self._api_get(f"/api/v1/nodes/{self.layout.node_name}")
        conds = node.get("status", {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)

    def _default_sa(self) -> bool:
        return bool(self._api_get("/api/v1/namespaces/default/serviceaccounts/default"))

    def _info(
        self, bins: KubeBinaries, images: dict[str, Image], server: str, backend: str, mesh: bool
    ) -> dict[str, Any]:
        lay = self.layout
        return {
            "kubeconfig": str(lay.kubeconfig),
            "kubeconfig_node": str(lay.kubeconfig_node),
            "server": server,
            "server_in_node": lay.api_server_in_node(),
            "node": lay.node_name,
            "node_ip": lay.node_ip,
            "node_netns": str(lay.node_netns),
            "node_mnt_ns": str(lay.mnt_ns),
            "nsenter": daemons.nsenter_prefix(lay),
            "cni_bin_dir": str(lay.cni_bin_dir),
            "cni_conf_dir": str(lay.cni_conf_dir),
            "cni_conflist": str(lay.cni_conflist),
            "cni_netns_dir_in_node": lay.netns_dir_in_node,
            "ipam_dir": str(lay.ipam_dir),
            "pod_cidr": lay.pod_cidr,
            "cgroup_root": lay.cgroup_root,
            "cgroup_dirs": [str(d) for d in lay.cgroup_dirs()],
            "run_dir": str(lay.state_dir),
            "logs_dir": str(lay.logs_dir),
            "istio_cni_run_dir": str(lay.istio_cni_run),
            "istio_cni_run_dir_in_node": lay.istio_cni_run_in_node,
            "ztunnel_socket": str(lay.ztunnel_socket),
            "ztunnel_socket_in_node": lay.ztunnel_socket_in_node,
            "ztunnel_access_log": str(lay.logs_dir / "ztunnel-access.log"),
            "ztunnel_ca_dir": str(lay.state_dir / "ztunnel-ca"),
            "containerd_socket": str(lay.containerd_socket),
            "kubelet_root": str(lay.kubelet_dir / "root"),
            "images": {name: image.ref for name, image in images.items()},
            "kubernetes_version": bins.version,
            "kubectl": str(bins.path("kubectl")),
            "backend": backend,
            "bpf_pin_root": str(lay.bpf_pin_root),
            "mesh": mesh,
            "pids": dict(self._launcher.pids),
            # seconds each bring-up wait took ("kube-apiserver /readyz", "node Ready", ...)
            "timings": dict(self.timings),
        }

    def _save(self, info: dict[str, Any]) -> None:
        tmp = self.layout.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=2))
        tmp.rename(self.layout.state_file)

    def _teardown_or_raise(self) -> None:
        problems = cleanup.teardown(self.layout)
        if problems:
            raise TestbedError("could not clean up a previous run: " + "; ".join(problems))

    def _dump_failed_logs(self) -> None:
        for name in self._launcher.pids:
            tail = self._launcher.log_tail(name, 8)
            if tail:
                _log(f"--- {name} log tail ---\n{tail}")
