"""/proc discovery on the real kernel: real processes in real ``pod<uid>`` cgroups (cgroup v1
``pids`` hierarchy) inside real throwaway namespaces. Everything made is removed."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from cni_plugin.netns import Netns
from node_agent.netns_finder import NetnsFinder

pytestmark = pytest.mark.netns
CGROUP_ROOT = Path("/sys/fs/cgroup/pids")


class Staging:
    def __init__(self) -> None:
        self.tag = f"icnia-finder-{secrets.token_hex(3)}"
        self.netns: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.cgroups: list[Path] = []

    def make_netns(self) -> str:
        name = f"icnia-f-{secrets.token_hex(3)}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        self.netns.append(name)
        return f"/run/netns/{name}"

    def pod_cgroup(self, uid: str, style: str) -> Path:
        if style == "cgroupfs":
            path = CGROUP_ROOT / self.tag / "kubepods" / "besteffort" / f"pod{uid}"
        else:  # systemd driver naming
            u = uid.replace("-", "_")
            path = CGROUP_ROOT / self.tag / "kubepods.slice" / f"kubepods-besteffort-pod{u}.slice"
        path.mkdir(parents=True, exist_ok=True)
        self.cgroups.append(path)
        return path

    def spawn(self, netns: str | None, cgroup: Path) -> subprocess.Popen[bytes]:
        argv = ["sleep", "120"] if netns is None else ["nsenter", f"--net={netns}", "sleep", "120"]
        p = subprocess.Popen(argv)
        self.procs.append(p)
        # Wait until nsenter has exec'd sleep in the target namespace, then move it.
        deadline = time.monotonic() + 5
        while netns is not None and time.monotonic() < deadline:
            if os.stat(f"/proc/{p.pid}/ns/net").st_ino == os.stat(netns).st_ino:
                break
            time.sleep(0.01)
        (cgroup / "cgroup.procs").write_text(str(p.pid))
        return p

    def cleanup(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()
        for path in sorted({*self.cgroups, *[q for c in self.cgroups for q in c.parents]},
                           key=lambda q: -len(q.parts)):  # fmt: skip
            if str(path).startswith(str(CGROUP_ROOT / self.tag)):
                with contextlib.suppress(OSError):
                    path.rmdir()
        for name in self.netns:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.fixture
def staging() -> Iterator[Staging]:
    if not CGROUP_ROOT.is_dir():
        pytest.skip("no cgroup v1 pids hierarchy on this machine")
    s = Staging()
    try:
        yield s
    finally:
        s.cleanup()
    assert not (CGROUP_ROOT / s.tag).exists()


@pytest.mark.parametrize("style", ["cgroupfs", "systemd"])
def test_finds_pod_netns_by_cgroup_and_oldest_wins(staging: Staging, style: str) -> None:
    uid = str(uuid.uuid4())
    first = staging.make_netns()
    second = staging.make_netns()
    cg = staging.pod_cgroup(uid, style)
    staging.spawn(None, cg)  # a process of the pod in the host namespace: skipped
    old = staging.spawn(first, cg)
    time.sleep(0.05)  # start times are in clock ticks (10 ms)
    staging.spawn(first, cg)  # same namespace: skipped as already seen
    staging.spawn(second, cg)  # newer namespace of the same pod: loses to the oldest
    finder = NetnsFinder("/proc", host_netns="/proc/self/ns/net")
    found = finder.find(uid)
    assert found is not None
    assert found.pid == old.pid
    assert found.ident.inode == os.stat(first).st_ino
    with Netns.open(found.path) as ns:  # opening never creates, and it is not the host's
        assert ns.inode == os.stat(first).st_ino
    other = str(uuid.uuid4())
    assert finder.find(other) is None


def test_host_reference_from_config(staging: Staging) -> None:
    """A node that is itself a namespace is usable as the host reference: pod processes in
    it (hostNetwork pods) are skipped."""
    uid = str(uuid.uuid4())
    node = staging.make_netns()
    cg = staging.pod_cgroup(uid, "cgroupfs")
    staging.spawn(node, cg)
    assert NetnsFinder("/proc", host_netns=node).find(uid) is None
    assert NetnsFinder("/proc", host_netns="/proc/self/ns/net").find(uid) is not None
