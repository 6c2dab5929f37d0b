"""Node-wide state has an owner and a lifetime a user can see (issue 20), driven through
``istio-cni-agent redirect`` as a user would.

eBPF: ``remove`` of the last namespace using the node-wide objects (pins, the ``nat`` map,
the ``istio_getsockopt`` cgroup link) removes them; before that, one line says they stay and
how to remove them; ``check`` reports them; ``uninstall-node`` removes them once no pod uses
them (pruning the pins of namespaces that are gone first). Each test has its own pin root
and its own cgroup (a child of the cgroup v2 root), so what other runs attach to the root
never counts. Host probe: ``check`` and ``uninstall-node`` see the agent's rule and ipsets in
``NODE_NETNS`` (a throwaway namespace here, never the host's). Last of the session: nothing
of this run is left under /sys/fs/bpf, and no getsockopt link of it is attached.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cni_plugin import constants as c
from node_agent.host_probe import HostProbe
from tests.conftest import BPF_AT_START, BPF_FS
from tests.netns import bpf_support
from tests.netns.bpf_support import CACHE_DIR, skip_if_unavailable
from tests.time_scale import scaled

pytestmark = pytest.mark.netns
REPO = Path(__file__).resolve().parents[2]


class Node:
    """One user's node: a pin root, a cgroup and a node namespace of its own."""

    def __init__(self, tmp: Path, make_netns: Callable[[str], str]) -> None:
        from cni_plugin.bpf.availability import cgroup2_root

        tag = f"icnit-{os.getpid()}-node-{secrets.token_hex(3)}"
        self.pin_root = Path(BPF_FS) / tag
        self.cgroup = Path(cgroup2_root()) / tag
        self.cgroup.mkdir()
        self.node_netns = f"/run/netns/{make_netns('hostnode')}"
        run_dir = tmp / "run"
        run_dir.mkdir()
        shutil.copytree(CACHE_DIR, run_dir / "bpf-cache")  # compiled once per machine
        self.env = {
            "PATH": os.environ["PATH"],
            "PYTHONPATH": str(REPO),
            "CNI_AGENT_RUN_DIR": str(run_dir),
            "AMBIENT_EBPF_PIN_ROOT": str(self.pin_root),
            "HOST_CGROUP2_ROOT": str(self.cgroup),
            "NODE_NETNS": self.node_netns,
        }

    def redirect(self, *args: str, backend: str = "ebpf") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "node_agent.cli", "redirect", *args, "--backend", backend],
            env=self.env, cwd=REPO, capture_output=True, text=True, timeout=scaled(120),
        )  # fmt: skip

    def attached(self) -> list[str]:
        """Names of the programs attached to this node's cgroup."""
        out = subprocess.run(
            ["bpftool", "-j", "cgroup", "show", str(self.cgroup)],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        return [p.get("name", "") for p in json.loads(out.strip() or "[]")]

    def close(self) -> None:
        shutil.rmtree(self.pin_root, ignore_errors=True)
        self.cgroup.rmdir()  # fails (and the test with it) if a program were still attached


@pytest.fixture
def node(tmp_path: Path, make_netns: Callable[[str], str]) -> Iterator[Node]:
    skip_if_unavailable()
    n = Node(tmp_path, make_netns)
    try:
        yield n
    finally:
        n.close()
    assert not n.pin_root.exists()


def _ok(res: subprocess.CompletedProcess[str]) -> list[str]:
    assert res.returncode == 0, res.stderr
    return res.stdout.splitlines()


def test_remove_of_the_last_pod_removes_the_node_wide_objects(
    node: Node, make_netns: Callable[[str], str]
) -> None:
    pods = [f"/run/netns/{make_netns('pod')}" for _ in range(3)]
    for p in pods:
        _ok(node.redirect("apply", "--netns", p))
    assert node.attached() and all(n.startswith("istio_getsockop") for n in node.attached())
    lines = _ok(node.redirect("check", "--netns", pods[0]))
    assert f"node: ebpf objects under {node.pin_root}: 3 pod(s) pinned" in "\n".join(lines)
    assert any(
        ln.startswith(f"node: istio_getsockopt attached to {node.cgroup} through") for ln in lines
    )
    for i, p in enumerate(pods[:-1]):
        last = _ok(node.redirect("remove", "--netns", p))[-1]
        assert last.startswith(f"node: the ebpf objects under {node.pin_root} stay")
        assert f"({len(pods) - 1 - i} pod(s) still use them)" in last
        assert "`istio-cni-agent redirect uninstall-node --backend ebpf`" in last
        assert node.pin_root.exists() and node.attached()
    last = _ok(node.redirect("remove", "--netns", pods[-1]))[-1]
    assert last.startswith(f"node: removed the ebpf objects under {node.pin_root}")
    assert not node.pin_root.exists()
    assert node.attached() == []  # the cgroup link went with its pin
    lines = _ok(node.redirect("check"))  # no --netns: the node-wide state only
    assert lines[0] == f"node: no ebpf objects under {node.pin_root}"
    assert all("absent" in ln for ln in lines[1:] if ln.startswith("node: host probe"))


def test_uninstall_node_refuses_while_a_pod_uses_them_and_prunes_vanished_ones(
    node: Node, make_netns: Callable[[str], str]
) -> None:
    live, gone = make_netns("live"), make_netns("gone")
    for name in (live, gone):
        _ok(node.redirect("apply", "--netns", f"/run/netns/{name}"))
    refused = node.redirect("uninstall-node")
    assert refused.returncode == 1, refused
    assert "stay (2 pod(s) still use them)" in refused.stdout and node.attached()
    subprocess.run(["ip", "netns", "del", gone], check=True)  # a pod gone without DEL
    still = _ok(node.redirect("remove", "--netns", f"/run/netns/{live}"))[-1]
    assert "stay (1 pod(s) still use them)" in still  # the vanished one's pins
    done = _ok(node.redirect("uninstall-node"))
    assert done[0].startswith(f"node: removed the ebpf objects under {node.pin_root}")
    assert not node.pin_root.exists() and node.attached() == []


def test_rule_backends_and_the_host_probe_state_say_who_owns_them(
    node: Node, make_netns: Callable[[str], str]
) -> None:
    pod = f"/run/netns/{make_netns('ipt')}"
    _ok(node.redirect("apply", "--netns", pod, backend="iptables"))
    last = _ok(node.redirect("remove", "--netns", pod, backend="iptables"))[-1]
    assert last.startswith("node: the iptables backend keeps nothing node-wide")
    assert "removed by `istio-cni-agent redirect uninstall-node`" in last
    # The agent's host probe rule and sets, in the node namespace.
    probe = HostProbe(ipv6=True, node_netns=node.node_netns)
    probe.setup()
    try:
        probe.add("uid-1", ("10.98.0.7",))
        lines = _ok(node.redirect("check", backend="nftables"))
        assert lines[0].startswith("node: the nftables backend keeps nothing node-wide")
        assert (
            f"node: host probe (inet): ipset {c.PROBE_IPSET_V4} 1 entry, nat "
            f"{c.CHAIN_POSTROUTING} rule present"
        ) in lines
        refused = node.redirect("uninstall-node", backend="iptables")
        assert refused.returncode == 1 and "1 pod address(es) still in them" in refused.stdout
        assert probe.members() == {"10.98.0.7": "uid-1"}
        probe.remove("uid-1", ("10.98.0.7",))
        _ok(node.redirect("uninstall-node", backend="iptables"))
        lines = _ok(node.redirect("check", backend="iptables"))
        assert all(ln.endswith("absent, nat ISTIO_POSTRT rule absent") for ln in lines[1:])
    finally:
        probe.teardown()


@pytest.mark.after_ebpf_suite
def test_nothing_of_this_run_is_left_under_bpffs_or_attached() -> None:
    """After every other test of the session: this process's shared pin root goes (as at
    exit); then no pin root of this run (``icnit-<pid>``, ``icnit-<pid>-*``) and no product
    default root (``istio-cni``) made during the run remains, no cgroup getsockopt link is
    pinned under one, and none is held without a pin (the backend keeps a link only by its
    pin, so an unpinned one is a leaked descriptor). Testbed roots have their own check."""
    if not os.path.isdir(BPF_FS):
        pytest.skip(f"no bpf filesystem at {BPF_FS}")
    shutil.rmtree(bpf_support.PIN_ROOT, ignore_errors=True)
    mine = f"icnit-{os.getpid()}"

    def of_this_run(name: str) -> bool:
        return (
            name == mine
            or name.startswith(f"{mine}-")
            or (name == "istio-cni" and name not in BPF_AT_START)
        )

    out = subprocess.run(
        ["bpftool", "-j", "-f", "link", "show"], capture_output=True, text=True, check=True
    ).stdout
    links = [
        ln for ln in json.loads(out.strip() or "[]") if ln.get("attach_type") == "cgroup_getsockopt"
    ]
    pinned_here = [
        ln["id"]
        for ln in links
        if any(of_this_run(Path(p).relative_to(BPF_FS).parts[0]) for p in ln.get("pinned", []))
    ]
    unpinned = [ln["id"] for ln in links if not ln.get("pinned")]
    left = sorted(name for name in os.listdir(BPF_FS) if of_this_run(name))
    assert left == [], f"left under {BPF_FS}: {left}"
    assert pinned_here == [], f"cgroup getsockopt links still pinned by this run: {pinned_here}"
    assert unpinned == [], f"cgroup getsockopt links held without a pin: {unpinned}"
