"""The redirection suite on other real kernels: Debian's 6.1 and 6.12 booted under qemu TCG
(virtme-ng) over this machine's filesystem, by the runner users call
(``python -m vagrant.run_kernels``). ``make vm-test`` runs this file.

Slow (a boot is ~15 s, then 12x to 100x the host's test time), hence marker ``vm``, which
``make test`` leaves out. ``ICNI_VM_KERNELS`` picks the kernels (default ``6.1 6.12``),
``ICNI_VM_PYTEST_ARGS`` a pytest selection to run instead of ``-m netns``.
Each kernel's logs, JUnit file and summary stay in ``build/vm/<release>/``."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

# A full suite on one kernel takes tens of minutes; the project-wide limit is 300 s per test.
pytestmark = [pytest.mark.vm, pytest.mark.timeout(4 * 3600)]

REPO = Path(__file__).resolve().parents[2]
KERNELS = os.environ.get("ICNI_VM_KERNELS", "6.1 6.12").split()
# A pytest selection to run inside instead of the whole netns suite (e.g. a CI smoke subset).
SELECTION = shlex.split(os.environ.get("ICNI_VM_PYTEST_ARGS", ""))


def _run(
    out: Path, kernel: str, *pytest_args: str, kernel_args: tuple[str, ...] = ()
) -> tuple[int, dict[str, Any], str]:
    summary = out / f"summary-{kernel}.json"
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "vagrant.run_kernels", kernel, "--out", str(out),
           "--json", str(summary)]  # fmt: skip
    for arg in kernel_args:
        cmd += ["--kernel-arg", arg]
    if pytest_args:
        cmd += ["--", *pytest_args]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=4 * 3600)
    output = proc.stdout + proc.stderr
    assert summary.is_file(), output
    results = json.loads(summary.read_text())
    summary.unlink()
    assert len(results) == 1, output
    return proc.returncode, results[0], output


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
    rc, r, output = _run(
        tmp_path / "out", KERNELS[0], "--rootdir", str(tmp_path), str(tmp_path / "test_probe.py")
    )
    assert rc == 1, output
    assert r["exit_code"] == 1 and not r["ok"], output
    assert r["totals"] == {"passed": 1, "skipped": 1, "failed": 1}, output
    assert r["by_backend"]["ebpf"]["skipped"] == 1, output
    assert r["skip_reasons"] == {"deliberate skip reason": 1}, output
    assert "FAILED" in output and "deliberate" in output, output


@pytest.mark.parametrize("kernel", KERNELS)
def test_netns_suite_passes_on_another_kernel(kernel: str) -> None:
    rc, r, output = _run(REPO / "build" / "vm", kernel, *SELECTION)
    assert r["kernel"] != os.uname().release and r["backend"] == "qemu-tcg", output
    guest_log = (REPO / "build" / "vm" / r["kernel"] / "guest.log").read_text()
    assert f"guest kernel: {r['kernel']}" in guest_log, guest_log[-2000:]
    assert r["exit_code"] == 0, output + guest_log[-4000:]
    assert r["totals"]["failed"] == 0 and r["totals"]["passed"] > 0, output
    assert r["missing_modules"] == [], output
    # A backend the kernel cannot support is skipped with a stated reason, never silently.
    assert "(no reason given)" not in r["skip_reasons"], output
    assert rc == 0, output


def test_agent_on_a_kernel_booted_without_ipv6_runs_ipv4_only(tmp_path: Path) -> None:
    """Issue 14.7 on a real kernel with no IPv6 at all: with AMBIENT_IPV6 on, the agent starts,
    says so in one warning line and enrols a pod over IPv4 (the netns test it runs skips on a
    kernel that has IPv6, so it is only meaningful here)."""
    select = "tests/netns/test_host_probe_lifecycle.py"
    rc, r, output = _run(
        tmp_path / "out", KERNELS[0], select, "-k", "kernel_without_ipv6",
        kernel_args=("ipv6.disable=1",),
    )  # fmt: skip
    guest_log = (tmp_path / "out" / f"{r['kernel']}_ipv6.disable-1" / "guest.log").read_text()
    cmdline = next(ln for ln in guest_log.splitlines() if ln.startswith("guest cmdline: "))
    assert "ipv6.disable=1" in cmdline.split(), guest_log[-2000:]
    assert r["totals"] == {"passed": 1, "skipped": 0, "failed": 0}, output + guest_log[-4000:]
    assert rc == 0, output
