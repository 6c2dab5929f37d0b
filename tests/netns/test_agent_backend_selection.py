"""The agent's backend choice on a real kernel: ebpf when it can run, else the configured
fallback or a refusal (one line, exit 1, nothing created); pins of pods whose namespace
went away pruned; node objects removed on uninstall. The unavailable case is staged for
real: a pin root that is not on a bpf filesystem (what ``availability.probe`` checks
first), never a mocked probe."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from cni_plugin.errors import ConfigError
from cni_plugin.netns import Netns
from cni_plugin.redirection.settings import RedirectSettings
from node_agent.agent_assembly import Agent
from node_agent.backend_selection import select_backend
from node_agent.bpf_pins import PinPruner, live_netns_inodes
from node_agent.config import AgentConfig
from tests.netns.bpf_support import CACHE_DIR, skip_if_unavailable
from tests.time_scale import scaled

pytestmark = pytest.mark.netns
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def bpf_root() -> Iterator[Path]:
    skip_if_unavailable()
    root = Path(f"/sys/fs/bpf/icnit-sel-{secrets.token_hex(4)}")
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert not root.exists()


def _cfg(run_dir: Path, pin_root: Path, fallback: str = "", cgroup: str = "") -> AgentConfig:
    env = {
        "HOST_CGROUP2_ROOT": cgroup,
        "HOST_PROC": "/proc",
        "HOST_NETNS_DIR": "/run/netns",
        "NODE_NAME": "n1",
        "AMBIENT_REDIRECT_MODE": "ebpf",
        "AMBIENT_REDIRECT_FALLBACK": fallback,
        "AMBIENT_EBPF_PIN_ROOT": str(pin_root),
        "CNI_AGENT_RUN_DIR": str(run_dir),
    }
    return AgentConfig.from_env(env)


def test_ebpf_chosen_when_it_can_run(tmp_path: Path, bpf_root: Path) -> None:
    shutil.copytree(CACHE_DIR, tmp_path / "bpf-cache")  # the compiled image: no recompile
    sel = select_backend(_cfg(tmp_path, bpf_root))
    assert sel.rules.name == "ebpf" and sel.ebpf is sel.rules
    assert sel.ebpf.pin_root == bpf_root and sel.ebpf.cache_dir == str(tmp_path / "bpf-cache")
    assert not bpf_root.exists()  # choosing pins nothing; the first apply does


def test_unavailable_ebpf_falls_back_only_when_configured(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    not_bpffs = tmp_path / "pins"  # tmpfs/ext4, not bpffs: the probe's first check fails
    with pytest.raises(ConfigError) as refused:
        select_backend(_cfg(tmp_path, not_bpffs))
    msg = str(refused.value)
    assert f"{not_bpffs} is not on a bpf filesystem" in msg
    assert "mount -t bpf bpf /sys/fs/bpf" in msg and "AMBIENT_REDIRECT_FALLBACK=iptables" in msg
    with caplog.at_level(logging.WARNING, logger="node_agent.backend"):
        sel = select_backend(_cfg(tmp_path, not_bpffs, fallback="iptables"))
    assert sel.rules.name == "iptables" and sel.ebpf is None
    (rec,) = [r for r in caplog.records if "falling back" in r.getMessage()]
    fields = cast(dict[str, str], rec.__dict__["fields"])
    assert fields["fallback"] == "iptables" and "not on a bpf filesystem" in fields["reason"]
    assert not not_bpffs.exists()


def test_unavailable_cgroup2_root_names_the_mount(tmp_path: Path, bpf_root: Path) -> None:
    """HOST_CGROUP2_ROOT pointing at something that is not a cgroup v2 hierarchy (the
    DaemonSet mount missing): the refusal names the getsockopt hook's need and the fix."""
    with pytest.raises(ConfigError) as refused:
        select_backend(_cfg(tmp_path, bpf_root, cgroup=str(tmp_path)))
    msg = str(refused.value)
    assert f"no cgroup v2 hierarchy at {tmp_path}" in msg and "mount cgroup2" in msg, msg
    sel = select_backend(_cfg(tmp_path, bpf_root, fallback="nftables", cgroup=str(tmp_path)))
    assert sel.rules.name == "nftables" and sel.ebpf is None
    assert not bpf_root.exists()


def _agent_run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(REPO),
        "NODE_NAME": "n1",
        "AMBIENT_REDIRECT_MODE": "ebpf",
        "AMBIENT_EBPF_PIN_ROOT": str(tmp_path / "pins"),
        "CNI_AGENT_RUN_DIR": str(tmp_path / "run"),
        "KUBECONFIG": str(tmp_path / "no-such-kubeconfig"),
        "HEALTH_PORT": "0",
        "MONITORING_PORT": "0",
    }
    return subprocess.run(
        [sys.executable, "-m", "node_agent.cli", "run"],
        env={**base, **env}, capture_output=True, text=True, timeout=scaled(60), cwd=REPO,
    )  # fmt: skip


def test_agent_refuses_to_start_with_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    res = _agent_run(tmp_path)
    assert res.returncode == 1, res
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("istio-cni-agent run: the ebpf redirection backend cannot run")
    assert "is not on a bpf filesystem: mount it with 'mount -t bpf bpf /sys/fs/bpf'" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no run dir, no pins, no cache


def test_agent_with_fallback_goes_on_with_iptables(tmp_path: Path) -> None:
    """Same node, AMBIENT_REDIRECT_FALLBACK=iptables: the warning names what is missing and
    the start carries on with iptables (until the API, absent here, stops it)."""
    res = _agent_run(tmp_path, AMBIENT_REDIRECT_FALLBACK="iptables")
    assert "falling back" in res.stderr and "not on a bpf filesystem" in res.stderr, res.stderr
    assert "cannot run on this node" not in res.stderr
    assert (
        res.stderr.strip()
        .splitlines()[-1]
        .startswith("istio-cni-agent run: cannot load Kubernetes credentials")
    )
    assert not (tmp_path / "pins").exists()


def test_pins_of_vanished_pods_are_pruned(make_netns: Callable[[str], str], bpf_root: Path) -> None:
    from cni_plugin.bpf.backend import EbpfBackend

    backend = EbpfBackend(pin_root=str(bpf_root), cache_dir=CACHE_DIR)
    live, gone = make_netns("prlive"), make_netns("prgone")
    inodes = {}
    for ns in (live, gone):
        backend.apply(f"/run/netns/{ns}", RedirectSettings())
        with Netns.open(f"/run/netns/{ns}") as n:
            inodes[ns] = n.inode
    assert backend.pinned_pods() == set(inodes.values())
    subprocess.run(["ip", "netns", "del", gone], check=True)  # a pod gone without CNI DEL
    assert inodes[gone] not in live_netns_inodes("/proc", "/run/netns")
    # No view of the host's processes (proc root not mounted): an error, nothing pruned.
    with pytest.raises(OSError):
        PinPruner(backend, "/nonexistent-proc", "/run/netns").run()
    assert backend.pinned_pods() == set(inodes.values())
    # Pins that appeared after the candidates were listed are never pruned.
    assert backend.prune(set(), candidates=set()) == []
    assert PinPruner(backend, "/proc", "/run/netns").run() == [inodes[gone]]
    assert backend.pinned_pods() == {inodes[live]}
    assert PinPruner(backend, "/proc", "/run/netns").run() == []
    backend.remove(f"/run/netns/{live}", RedirectSettings())
    assert backend.uninstall_node() and not bpf_root.exists()


def test_agent_stop_uninstalls_node_objects_only_on_uninstall(
    make_netns: Callable[[str], str], tmp_path: Path, bpf_root: Path
) -> None:
    """The installer's uninstall-vs-upgrade decision also decides the ebpf node objects:
    an upgrade keeps them (the next agent adopts), an uninstall removes them (pods gone)."""
    shutil.copytree(CACHE_DIR, tmp_path / "bpf-cache")
    ns = make_netns("prstop")
    for upgrade in (True, False):
        agent = Agent(
            _cfg(tmp_path, bpf_root),
            # never called (the agent is not started); only its watch interrupt is wired in
            kube=cast(Any, SimpleNamespace(interrupt_watches=lambda: None)),
            probes=cast(Any, object()),
            is_upgrade=lambda u=upgrade: u,  # type: ignore[misc]
        )
        assert agent.selection.ebpf is not None and agent.rules.name == "ebpf"
        agent.selection.ebpf.apply(f"/run/netns/{ns}", RedirectSettings())
        agent.selection.ebpf.remove(f"/run/netns/{ns}", RedirectSettings())
        # A pod deleted without DEL: the agent's own reconcile pass prunes its pins.
        gone = make_netns("prpass")
        agent.selection.ebpf.apply(f"/run/netns/{gone}", RedirectSettings())
        assert len(agent.selection.ebpf.pinned_pods()) == 1
        subprocess.run(["ip", "netns", "del", gone], check=True)
        agent.reconciler.run_pass()
        assert agent.selection.ebpf.pinned_pods() == set()
        node_pins = sorted(p.name for p in bpf_root.iterdir())
        assert any(n.startswith("node-") for n in node_pins), node_pins
        agent.stop()
        assert bpf_root.exists() == upgrade
