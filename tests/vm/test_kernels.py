"""The redirection suite on another real kernel: Debian's 6.1 booted under qemu TCG
(virtme-ng) over this machine's filesystem, by the same runner `make vm-test` uses.

Slow (a boot is ~15 s, tests run ~12x slower than on the host), hence marker ``vm``,
which ``make test`` leaves out; ``make vm-test`` runs every kernel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.vm

REPO = Path(__file__).resolve().parents[2]
KERNEL = os.environ.get("ICNI_VM_KERNEL", "6.1")


def _run(tmp_path: Path, *pytest_args: str) -> tuple[int, dict[str, Any], str]:
    summary = tmp_path / "summary.json"
    cmd = [sys.executable, "-m", "vagrant.run_kernels", KERNEL, "--out", str(tmp_path / "out"),
           "--json", str(summary)]  # fmt: skip
    if pytest_args:
        cmd += ["--", *pytest_args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600)
    results = json.loads(summary.read_text())
    assert len(results) == 1, proc.stdout + proc.stderr
    return proc.returncode, results[0], proc.stdout + proc.stderr


def test_netns_suite_passes_on_another_kernel(tmp_path: Path) -> None:
    rc, r, output = _run(tmp_path)
    assert r["kernel"] != os.uname().release and r["backend"] == "qemu-tcg", output
    guest_log = (tmp_path / "out" / r["kernel"] / "guest.log").read_text()
    assert f"guest kernel: {r['kernel']}" in guest_log, guest_log[-2000:]
    assert r["exit_code"] == 0, output + guest_log[-4000:]
    assert r["totals"]["failed"] == 0 and r["totals"]["passed"] > 0, output
    assert r["missing_modules"] == [], output
    # A backend the kernel cannot support is skipped with a stated reason, never silently.
    assert "(no reason given)" not in r["skip_reasons"], output
    assert rc == 0, output


def test_failures_in_the_guest_come_back_out(tmp_path: Path) -> None:
    # The guest sees the host's /tmp (copy-on-write), so a test file written here runs there.
    (tmp_path / "test_probe.py").write_text(textwrap.dedent('''
        import os
        import pytest

        def test_kernel_is_not_the_hosts():
            assert os.uname().release != HOST_RELEASE

        def test_fails():
            assert False, "deliberate"

        def test_ebpf_skipped():
            pytest.skip("deliberate skip reason")
    '''.replace("HOST_RELEASE", repr(os.uname().release))))  # fmt: skip
    rc, r, output = _run(tmp_path, "--rootdir", str(tmp_path), str(tmp_path / "test_probe.py"))
    assert rc == 1, output
    assert r["exit_code"] == 1 and not r["ok"], output
    assert r["totals"] == {"passed": 1, "skipped": 1, "failed": 1}, output
    assert r["by_backend"]["ebpf"]["skipped"] == 1, output
    assert r["skip_reasons"] == {"deliberate skip reason": 1}, output
    assert "FAILED" in output and "deliberate" in output, output
