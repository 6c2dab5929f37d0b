"""NetnsFinder over a staged /proc tree (files stand in for nsfs entries: the finder only
stats them). The real-kernel version is tests/netns/test_netns_finder_real.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from node_agent.netns_finder import NetnsFinder, pod_uid_from_cgroup, start_time

UID = "1234abcd-0000-1111-2222-333344445555"


@pytest.mark.parametrize(
    "cgroup",
    [
        "12:pids:/kubepods/besteffort/pod1234abcd-0000-1111-2222-333344445555/0123abc",
        "3:cpu:/icnt/kubepods/burstable/pod1234abcd-0000-1111-2222-333344445555",
        "0::/kubepods.slice/kubepods-burstable.slice/"
        "kubepods-burstable-pod1234abcd_0000_1111_2222_333344445555.slice/cri-containerd-ab.scope",
        "0::/kubepods.slice/kubepods-pod1234ABCD_0000_1111_2222_333344445555.slice/crio-77.scope",
        "1:name=systemd:/user.slice\n2:cpu:/kubepods/pod1234abcd-0000-1111-2222-333344445555.scope",
    ],
)
def test_uid_from_cgroup_forms(cgroup: str) -> None:
    assert pod_uid_from_cgroup(cgroup) == UID


@pytest.mark.parametrize(
    "cgroup",
    [
        "1:name=systemd:/user.slice/user-0.slice",
        "2:cpu:/kubepods/besteffort",
        "2:cpu:/kubepods/xpod1234abcd-0000-1111-2222-333344445555",  # not a segment start
        "2:cpu:/kubepods/pod1234abcd-0000-1111-2222-33334444555",  # short uid
    ],
)
def test_no_uid(cgroup: str) -> None:
    assert pod_uid_from_cgroup(cgroup) is None


def test_start_time_with_spaces_in_comm() -> None:
    fields = ["S"] + [str(i) for i in range(4, 60)]
    fields[22 - 3] = "987654"
    assert start_time("42 (we ird) proc) " + " ".join(fields)) == 987654


class ProcTree:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "proc").mkdir()
        self.nsdir = root / "ns"
        self.nsdir.mkdir()

    def netns(self, name: str) -> Path:
        p = self.nsdir / name
        p.touch()
        return p

    def proc(self, pid: int, netns: Path, cgroup: str, start: int) -> None:
        d = self.root / "proc" / str(pid)
        (d / "ns").mkdir(parents=True)
        os.symlink(netns, d / "ns" / "net")
        (d / "cgroup").write_text(cgroup + "\n")
        fields = ["S"] + ["0"] * 50
        fields[22 - 3] = str(start)
        (d / "stat").write_text(f"{pid} (pause) " + " ".join(fields) + "\n")


def test_scan_skips_host_and_prefers_oldest(tmp_path: Path) -> None:
    t = ProcTree(tmp_path)
    host = t.netns("host")
    a, a2, b = t.netns("a"), t.netns("a2"), t.netns("b")
    uid_b = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"
    t.proc(1, host, f"1:cpu:/kubepods/pod{UID}/x", 1)  # hostNetwork pod: skipped
    t.proc(10, a2, f"1:cpu:/kubepods/pod{UID}/x", 500)  # newer namespace, same pod
    t.proc(11, a, f"1:cpu:/kubepods/pod{UID}/x", 100)  # oldest: wins
    t.proc(12, a, f"1:cpu:/kubepods/pod{UID}/y", 50)  # same inode as 11: skipped as seen
    t.proc(20, b, f"1:cpu:/kubepods/pod{uid_b}/x", 7)
    t.proc(30, t.netns("c"), "1:cpu:/system.slice/sshd.service", 3)
    f = NetnsFinder(str(tmp_path / "proc"), host_netns=str(host))
    found = f.scan()
    assert set(found) == {UID, uid_b}
    assert found[UID].ident.inode == os.stat(a).st_ino
    assert found[uid_b].pid == 20
    assert f.find(uid_b) is not None and f.find("ffffffff-0000-0000-0000-000000000000") is None
    only = f.scan({uid_b})
    assert set(only) == {uid_b}


def test_scan_of_missing_root_is_empty(tmp_path: Path) -> None:
    assert NetnsFinder(str(tmp_path / "nope")).scan() == {}


def test_find_shares_a_recent_walk_and_rescans_when_stale(tmp_path: Path) -> None:
    t = ProcTree(tmp_path)
    host = t.netns("host")
    uids = [f"{i:08x}-0000-1111-2222-333344445555" for i in range(3)]
    for i, uid in enumerate(uids):
        t.proc(10 + i, t.netns(f"p{i}"), f"1:cpu:/kubepods/pod{uid}/x", 5)
    f = NetnsFinder(str(tmp_path / "proc"), host_netns=str(host), reuse_seconds=60)
    assert all(f.find(u) is not None for u in uids)
    assert f.scans == 1  # one walk served every pod
    # The pod's process went away (sandbox replaced): the cached answer is not reused.
    (tmp_path / "proc" / "10" / "ns" / "net").unlink()
    t.proc(20, t.netns("p0-new"), f"1:cpu:/kubepods/pod{uids[0]}/x", 9)
    found = f.find(uids[0])
    assert found is not None and found.pid == 20 and f.scans == 2
    assert f.find("ffffffff-0000-1111-2222-333344445555") is None and f.scans == 3
