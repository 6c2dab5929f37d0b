"""``down`` removes everything even when the state of a run was lost (a crashed ``up``).

Uses its own instance (``icni-tb-crash<pid>``) so it never touches the session's node; runs
before the session node exists (file order), so the two are not up at the same time.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from testbed import cleanup
from testbed.layout import Layout
from testbed.node import Testbed
from tests.testbed import pods as P

pytestmark = [pytest.mark.testbed, pytest.mark.timeout(1800)]


def _host_mounts_mentioning(text: str) -> list[str]:
    return [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if text in line]


def _processes_mentioning(text: str) -> list[int]:
    out: list[int] = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if text.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(int(pid))
        except OSError:
            pass
    return out


def test_down_after_lost_state_leaves_nothing(tmp_path: Path) -> None:
    lay = Layout.for_instance(f"crash{os.getpid()}")
    bed = Testbed(lay)
    try:
        info = bed.up()
        bed.kubectl(
            "apply",
            "-f",
            "-",
            input=P.manifest("default", [P.httpd_pod("web", info["images"]["httpd"], 8080)]),
        )
        P.wait_ready(bed, "default", ["web"])
        assert P.node_netns_files(bed), "a running pod should have a cni-* netns"
        assert cleanup.node_processes(lay, cleanup.recorded_pids(lay))

        # The "crash": every record of what was started is gone.
        lay.state_file.unlink()
        lay.pids_file.unlink()
        fresh = Testbed(lay)
        assert fresh.down() == []
    finally:
        Testbed(lay).down()

    assert cleanup.leftovers(lay) == []
    assert not lay.state_dir.exists()
    assert not lay.node_netns.exists()
    assert _host_mounts_mentioning(str(lay.state_dir)) == []
    assert _processes_mentioning(str(lay.state_dir)) == []
    assert all(not d.exists() for d in lay.cgroup_dirs())
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert lay.netns_name not in names
