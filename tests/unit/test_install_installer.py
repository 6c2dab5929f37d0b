"""The installer on a real filesystem with real inotify: install, repair within 5 s when
"another CNI" rewrites or deletes the config, follow a new first file, and leave the conf
and bin dirs exactly as they were on uninstall (but untouched on upgrade)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest

from install import conflist
from install.config import InstallConfig
from install.installer import Installer
from tests.unit.test_install_conflist import ref

Snapshot = dict[str, tuple[bytes, int]]


def snapshot(*dirs: str) -> Snapshot:
    out: Snapshot = {}
    for d in dirs:
        for name in sorted(os.listdir(d)):
            p = os.path.join(d, name)
            with open(p, "rb") as f:
                out[p] = (f.read(), os.stat(p).st_mode & 0o777)
    return out


@pytest.fixture
def node(tmp_path: Any) -> dict[str, str]:
    dirs = {k: str(tmp_path / k) for k in ("net", "bin", "run", "src", "sa")}
    for d in dirs.values():
        os.makedirs(d)
    with open(os.path.join(dirs["src"], "istio-cni"), "wb") as f:
        f.write(b"#!/bin/sh\necho plugin\n")
    with open(os.path.join(dirs["sa"], "token"), "w") as f:
        f.write("service_account_token_string\n")
    with open(os.path.join(dirs["sa"], "ca.crt"), "wb") as f:
        f.write(ref("kube-ca.crt"))
    with open(os.path.join(dirs["bin"], "bridge"), "wb") as f:
        f.write(b"\x7fELF-bridge")
    os.chmod(os.path.join(dirs["bin"], "bridge"), 0o755)
    return dirs


def config(node: dict[str, str], **kw: Any) -> InstallConfig:
    base = InstallConfig(
        mounted_cni_net_dir=node["net"],
        cni_bin_source_dir=node["src"],
        cni_bin_target_dirs=(node["bin"],),
        run_dir=node["run"],
        plugin_log_level="debug",
        ambient_enabled=True,
        exclude_namespaces="kube-system",
        pod_namespace="istio-cni",
        k8s_service_host="10.96.0.1",
        k8s_service_port="443",
        kube_ca_file=os.path.join(node["sa"], "ca.crt"),
        sa_token_file=os.path.join(node["sa"], "token"),
    )
    return replace(base, **kw)


@pytest.fixture
def started() -> Iterator[Callable[[Installer], Installer]]:
    running: list[Installer] = []

    def start(inst: Installer) -> Installer:
        inst.start()
        running.append(inst)
        return inst

    yield start
    for inst in running:
        if inst._thread is not None:
            inst.stop(uninstall=False)


def put(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def wait_for(pred: Callable[[], bool], timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return time.monotonic() - t0
        time.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout}s")


def test_install_writes_binary_kubeconfig_and_entry(node: dict[str, str]) -> None:
    put(os.path.join(node["net"], "10-bridge.conf"), ref("bridge.conf"))
    inst = Installer(config(node))
    assert inst.install_once()
    binary = os.path.join(node["bin"], "istio-cni")
    assert os.stat(binary).st_mode & 0o777 == 0o755
    kc = os.path.join(node["run"], "istio-cni-kubeconfig")
    assert os.stat(kc).st_mode & 0o777 == 0o600
    with open(kc, "rb") as f:
        assert f.read() == ref("kubeconfig-tls")
    assert sorted(os.listdir(node["net"])) == ["10-bridge.conflist"]
    path = os.path.join(node["net"], "10-bridge.conflist")
    assert os.stat(path).st_mode & 0o777 == 0o644
    with open(path, "rb") as f:
        doc = conflist.loads(f.read(), path)
    assert doc["plugins"][-1]["ambient_enabled"] is True
    assert doc["plugins"][-1]["exclude_namespaces"] == ["kube-system"]
    assert inst.check() is None


def test_skip_tls_kubeconfig(node: dict[str, str]) -> None:
    put(os.path.join(node["net"], "10-list.conflist"), ref("list.conflist"))
    Installer(config(node, skip_tls_verify=True)).install_once()
    with open(os.path.join(node["run"], "istio-cni-kubeconfig"), "rb") as f:
        assert f.read() == ref("kubeconfig-skip-tls")


def test_named_invalid_config_is_rejected_and_left_alone(node: dict[str, str]) -> None:
    put(os.path.join(node["net"], "bad.conflist"), ref("invalid-map.conflist"))
    inst = Installer(config(node, cni_conf_name="bad.conflist"))
    with pytest.raises(conflist.ConflistError, match="no 'plugins'"):
        inst.install_once()
    with open(os.path.join(node["net"], "bad.conflist"), "rb") as f:
        assert f.read() == ref("invalid-map.conflist")


def test_waits_for_a_primary_config_then_installs(
    node: dict[str, str], started: Callable[[Installer], Installer]
) -> None:
    inst = started(Installer(config(node, min_repair_interval_s=0.0)))
    wait_for(lambda: inst.last_error is not None, 5.0)  # its first attempt is done
    assert not inst.ready and inst.last_error == "waiting for a primary CNI config"
    put(os.path.join(node["net"], "10-list.conflist"), ref("list.conflist"))
    assert inst.wait_ready(5)


def test_rewrite_by_another_cni_is_repaired_within_5s(
    node: dict[str, str], started: Callable[[Installer], Installer]
) -> None:
    path = os.path.join(node["net"], "10-list.conflist")
    put(path, ref("list.conflist"))
    # The installer's clock, moved one second on after it is ready: the rewrite does not
    # fall at the very edge of the 5 s repair rate limit, without the test waiting for it.
    skew = [0.0]
    inst = started(Installer(config(node), clock=lambda: time.monotonic() + skew[0]))
    assert inst.wait_ready(5)
    skew[0] = 1.0
    put(path, ref("list.conflist"))  # the primary CNI rewrites its file without our entry

    def repaired() -> bool:
        with open(path, "rb") as f:
            return conflist.has_entry(f.read(), path)

    elapsed = wait_for(repaired, 5.0)
    assert elapsed <= 5.0
    assert inst.wait_ready(2)


def test_deleted_entry_and_binary_are_reinserted(
    node: dict[str, str], started: Callable[[Installer], Installer]
) -> None:
    path = os.path.join(node["net"], "10-list.conflist")
    put(path, ref("list.conflist"))
    inst = started(Installer(config(node, min_repair_interval_s=0.5)))
    assert inst.wait_ready(5)
    os.unlink(os.path.join(node["bin"], "istio-cni"))
    wait_for(lambda: os.path.exists(os.path.join(node["bin"], "istio-cni")), 5.0)
    os.unlink(path)
    put(path, ref("list.conflist"))
    wait_for(lambda: inst.check() is None and inst.ready, 5.0)


def test_a_new_first_file_gets_the_entry(
    node: dict[str, str], started: Callable[[Installer], Installer]
) -> None:
    put(os.path.join(node["net"], "20-list.conflist"), ref("list.conflist"))
    inst = started(Installer(config(node, min_repair_interval_s=0.5)))
    assert inst.wait_ready(5)
    first = os.path.join(node["net"], "05-new.conflist")
    put(first, ref("list-no-istio.conflist"))

    def moved() -> bool:
        with open(first, "rb") as f:
            return conflist.has_entry(f.read(), first) and inst.conf_path == first

    wait_for(moved, 5.0)


def test_token_rotation_rewrites_kubeconfig(
    node: dict[str, str], started: Callable[[Installer], Installer]
) -> None:
    put(os.path.join(node["net"], "10-list.conflist"), ref("list.conflist"))
    inst = started(Installer(config(node, min_repair_interval_s=0.2)))
    assert inst.wait_ready(5)
    put(os.path.join(node["sa"], "token"), b"rotated-token\n")
    kc = os.path.join(node["run"], "istio-cni-kubeconfig")

    def rotated() -> bool:
        with open(kc, "rb") as f:
            return b"token: rotated-token\n" in f.read()

    wait_for(rotated, 5.0)


@pytest.mark.parametrize("given", ["bridge.conf", "list.conflist"])
def test_uninstall_restores_conf_and_bin_dirs_exactly(
    node: dict[str, str], started: Callable[[Installer], Installer], given: str
) -> None:
    put(os.path.join(node["net"], f"10-{given}"), ref(given))
    put(os.path.join(node["net"], "99-other.conflist"), ref("list-no-istio.conflist"))
    before = snapshot(node["net"], node["bin"])
    inst = started(Installer(config(node)))
    assert inst.wait_ready(5)
    assert snapshot(node["net"], node["bin"]) != before
    inst.stop(uninstall=True)
    assert snapshot(node["net"], node["bin"]) == before
    assert os.listdir(node["run"]) == []


def test_uninstall_after_another_cni_changed_the_file_removes_only_our_entry(
    node: dict[str, str],
) -> None:
    path = os.path.join(node["net"], "10-list.conflist")
    put(path, ref("list.conflist"))
    inst = Installer(config(node))
    inst.install_once()
    with open(path, "rb") as f:
        doc = conflist.loads(f.read(), path)
    doc["plugins"].insert(1, {"type": "portmap", "capabilities": {"portMappings": True}})
    put(path, conflist.dumps(doc))
    inst.cleanup()
    with open(path, "rb") as f:
        after = conflist.loads(f.read(), path)
    assert [p["type"] for p in after["plugins"]] == ["bridge", "portmap", "tuning"]


def test_upgrade_leaves_everything_in_place(
    node: dict[str, str], started: Callable[[Installer], Installer]
) -> None:
    put(os.path.join(node["net"], "10-list.conflist"), ref("list.conflist"))
    inst = started(Installer(config(node)))
    assert inst.wait_ready(5)
    installed = snapshot(node["net"], node["bin"], node["run"])
    inst.stop(uninstall=False)
    assert snapshot(node["net"], node["bin"], node["run"]) == installed
    # The next agent (same host paths) takes over and still restores on a later uninstall.
    nxt = started(Installer(config(node)))
    assert nxt.wait_ready(5)
    nxt.stop(uninstall=True)
    with open(os.path.join(node["net"], "10-list.conflist"), "rb") as f:
        assert f.read() == ref("list.conflist")


def test_missing_binary_source_is_a_clear_error(node: dict[str, str]) -> None:
    shutil.rmtree(node["src"])
    put(os.path.join(node["net"], "10-list.conflist"), ref("list.conflist"))
    from cni_plugin.errors import ConfigError

    with pytest.raises(ConfigError, match="make plugin"):
        Installer(config(node)).install_once()


def test_config_from_env_uses_istio_names() -> None:
    cfg = InstallConfig.from_env(
        {
            "MOUNTED_CNI_NET_DIR": "/n",
            "CNI_CONF_NAME": "10-x.conflist",
            "AMBIENT_ENABLED": "true",
            "EXCLUDE_NAMESPACES": "kube-system,istio-system",
            "POD_NAMESPACE": "istio-cni",
            "CNI_AGENT_RUN_DIR": "/r",
            "KUBERNETES_SERVICE_HOST": "10.0.0.1",
            "KUBERNETES_SERVICE_PORT": "443",
            "CHAINED_CNI_PLUGIN": "true",
        }
    )
    assert (cfg.mounted_cni_net_dir, cfg.cni_conf_name, cfg.run_dir) == (
        "/n",
        "10-x.conflist",
        "/r",
    )
    from cni_plugin.errors import ConfigError

    with pytest.raises(ConfigError, match="AMBIENT_ENABLED"):
        InstallConfig.from_env({"AMBIENT_ENABLED": "maybe"})


def test_outside_a_pod_credentials_come_from_kubeconfig(node: dict[str, str]) -> None:
    import json

    put(os.path.join(node["net"], "10-list.conflist"), ref("list.conflist"))
    admin = os.path.join(node["sa"], "admin.kubeconfig")
    put(
        admin,
        json.dumps(
            {
                "clusters": [
                    {
                        "name": "x",
                        "cluster": {
                            "server": "https://10.0.0.9:6443",
                            "certificate-authority": os.path.join(node["sa"], "ca.crt"),
                        },
                    }
                ],
                "users": [{"name": "admin", "user": {"token": "service_account_token_string"}}],
            }
        ).encode(),
    )
    cfg = config(node, sa_token_file=os.path.join(node["sa"], "absent"), fallback_kubeconfig=admin)
    Installer(cfg).install_once()
    with open(os.path.join(node["run"], "istio-cni-kubeconfig"), "rb") as f:
        assert f.read() == ref("kubeconfig-tls")  # host/port from KUBERNETES_SERVICE_*
    from cni_plugin.errors import ConfigError

    with pytest.raises(ConfigError, match="service account token"):
        Installer(config(node, sa_token_file=os.path.join(node["sa"], "absent"))).install_once()


def test_upgrade_or_uninstall_is_read_from_the_daemonset() -> None:
    from types import SimpleNamespace

    from install.teardown import is_upgrade

    class Api:
        def __init__(self, ds: Any) -> None:
            self.ds = ds
            self.asked: list[tuple[str, str]] = []

        def read_namespaced_daemon_set(self, name: str, namespace: str) -> Any:
            self.asked.append((namespace, name))
            if isinstance(self.ds, Exception):
                raise self.ds
            return self.ds

    present = Api(SimpleNamespace(metadata=SimpleNamespace(deletion_timestamp=None)))
    assert is_upgrade("istio-cni", present) is True
    assert present.asked == [("istio-cni", "istio-cni-node")]
    deleting = Api(SimpleNamespace(metadata=SimpleNamespace(deletion_timestamp="2026-01-01")))
    assert is_upgrade("istio-cni", deleting) is False
    assert is_upgrade("istio-cni", Api(RuntimeError("404 Not Found"))) is False


def make_tree_plugin(src: str, marker: str) -> None:
    """The shipped shape: src/istio-cni.d/{istio-cni,lib} and src/istio-cni -> into it."""
    tree = os.path.join(src, "istio-cni.d")
    os.makedirs(tree, exist_ok=True)
    with open(os.path.join(tree, "istio-cni"), "w") as f:
        f.write('#!/bin/sh\nd=$(dirname "$(readlink -f "$0")")\ncat "$d/lib.txt"\n')
    os.chmod(os.path.join(tree, "istio-cni"), 0o755)
    with open(os.path.join(tree, "lib.txt"), "w") as f:
        f.write(marker)
    link = os.path.join(src, "istio-cni")
    if os.path.lexists(link):
        os.unlink(link)
    os.symlink("istio-cni.d/istio-cni", link)


def test_directory_plugin_is_installed_as_a_version_dir_and_a_link(
    node: dict[str, str], started: Callable[[Installer], Installer]
) -> None:
    import subprocess

    make_tree_plugin(node["src"], "v1")
    put(os.path.join(node["net"], "10-list.conflist"), ref("list.conflist"))
    before = snapshot(node["net"], node["bin"])
    inst = started(Installer(config(node)))
    assert inst.wait_ready(5)
    link = os.path.join(node["bin"], "istio-cni")
    assert os.path.islink(link) and not os.path.isabs(os.readlink(link))
    assert subprocess.run([link], capture_output=True, text=True).stdout == "v1"
    assert inst.check() is None
    inst.stop(uninstall=False)

    make_tree_plugin(node["src"], "v2")  # an upgrade brings a new plugin version
    nxt = started(Installer(config(node)))
    assert nxt.wait_ready(5)
    assert subprocess.run([link], capture_output=True, text=True).stdout == "v2"
    assert len(os.listdir(os.path.join(node["bin"], ".istio-cni.d"))) == 1  # old one gone
    os.unlink(
        os.path.join(
            node["bin"],
            ".istio-cni.d",
            os.listdir(os.path.join(node["bin"], ".istio-cni.d"))[0],
            "lib.txt",
        )
    )  # tampering is repaired
    wait_for(lambda: nxt.check() is None and nxt.ready, 8.0)
    assert subprocess.run([link], capture_output=True, text=True).stdout == "v2"
    nxt.stop(uninstall=True)
    assert snapshot(node["net"], node["bin"]) == before
    assert not os.path.exists(os.path.join(node["bin"], ".istio-cni.d"))
