"""The runner's pure parts: which Debian kernel a series means, and reading pytest's JUnit
output (produced here by a real pytest run, not written by hand)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from vagrant.guest_run import GUEST_MODULES, guest_script
from vagrant.kernel_cache import is_release, newest_release, series_of
from vagrant.results import (
    KernelResult,
    backend_of,
    markdown_rows,
    read_junit,
    read_progress,
    result_from_json,
)

REPO = Path(__file__).resolve().parents[2]

APT_NAMES = [
    "linux-image-6.1.0-9-amd64",
    "linux-image-6.1.0-56-amd64",
    "linux-image-6.1.0-56-amd64-dbg",
    "linux-image-6.1.0-56-rt-amd64",
    "linux-image-6.12.99+deb12-amd64",
    "linux-image-6.12.117+deb12-amd64",
    "linux-image-6.12.117+deb12-amd64-unsigned",
    "linux-image-6.12.117+deb12-cloud-amd64",
    "linux-image-amd64",
]


def test_newest_release_is_numeric_and_ignores_flavours() -> None:
    assert newest_release("6.1", APT_NAMES) == "6.1.0-56-amd64"
    assert newest_release("6.12", APT_NAMES) == "6.12.117+deb12-amd64"
    assert newest_release("5.10", APT_NAMES) is None


def test_release_and_series() -> None:
    assert is_release("6.12.117+deb12-amd64")
    assert is_release("6.1.0-56-amd64")
    assert not is_release("6.1")
    assert not is_release("6.1.0-56-rt-amd64")
    assert series_of("6.12.117+deb12-amd64") == "6.12"


def test_backend_is_taken_from_the_test_id() -> None:
    assert backend_of("tests.behaviour.test_table", "test_outbound[nftables-v4]") == "nftables"
    assert backend_of("tests.netns.test_iptables_backend", "test_apply") == "iptables"
    assert backend_of("tests.netns.test_ebpf", "test_attach") == "ebpf"
    assert backend_of("tests.netns.test_bpf_programs", "test_outbound") == "ebpf"
    assert backend_of("tests.netns.test_bpffs_pins", "test_x") == "common"
    assert backend_of("tests.netns.test_netns", "test_entry") == "common"
    # Naming two backends is ambiguous (a comparison test): not credited to either.
    assert backend_of("tests.x", "test_iptables_vs_nftables") == "common"


def test_junit_from_a_real_pytest_run(tmp_path: Path) -> None:
    (tmp_path / "test_sample.py").write_text(
        textwrap.dedent("""
        import pytest

        @pytest.mark.parametrize("backend", ["iptables", "nftables", "ebpf"])
        def test_rule(backend):
            if backend == "ebpf":
                pytest.skip("kernel 6.1 lacks hook X")
            assert backend != "nftables", "boom"

        def test_common():
            pass
    """)
    )
    junit, progress = tmp_path / "junit.xml", tmp_path / "progress.jsonl"
    env = dict(os.environ, PYTHONPATH=str(REPO), ICNI_VM_PROGRESS=str(progress))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "vagrant.guest_plugin",
         "-q", "--rootdir", str(tmp_path), "--junitxml", str(junit),
         str(tmp_path / "test_sample.py")],
        capture_output=True, text=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout
    # The guest plugin's lines (what survives a run cut short) say the same as the JUnit file.
    partial = KernelResult("6.1.0-56-amd64", "qemu-tcg", None, 12.0)
    read_progress(progress, partial)
    result = KernelResult("6.1.0-56-amd64", "qemu-tcg", proc.returncode, 12.0)
    read_junit(junit, result)
    counts = {b: (c.passed, c.skipped, c.failed) for b, c in result.by_backend.items()}
    assert counts == {
        "common": (1, 0, 0),
        "ebpf": (0, 1, 0),
        "iptables": (1, 0, 0),
        "nftables": (0, 0, 1),
    }
    assert result.skip_reasons == {"kernel 6.1 lacks hook X": 1}
    assert len(result.failures) == 1 and "test_rule[nftables]" in result.failures[0]
    assert not result.ok
    assert partial.by_backend == result.by_backend
    assert partial.skip_reasons == result.skip_reasons
    assert len(partial.failures) == 1 and "test_rule[nftables]" in partial.failures[0]
    assert "boom" in partial.failures[0]
    result.command = "python -m vagrant.run_kernels 6.1"
    result.host_load = (1.5, 3.0)
    rows = markdown_rows([result])
    assert rows[3] == (
        "| 6.1.0-56-amd64 | qemu-tcg | nftables | 0 | 0 | 1 | 12 s | 2-3 "
        "| `python -m vagrant.run_kernels 6.1` |"
    )
    # summary.json round trip (what `--report` reads back).
    again = result_from_json(json.loads(json.dumps(result.to_json())))
    assert again == result


def test_ok_needs_tests_and_exit_zero() -> None:
    assert not KernelResult("k", "qemu-tcg", 0, 1.0).ok  # nothing ran
    assert not KernelResult("k", "qemu-tcg", None, 1.0).ok


def test_guest_script_loads_modules_and_reports_exit_code(tmp_path: Path) -> None:
    script = guest_script(Path("/repo"), tmp_path, ["-m", "netns", "-k", "a or b"])
    assert f"modprobe -a {' '.join(GUEST_MODULES)} 2>&1" in script
    assert "-m pytest -p no:cacheprovider --junitxml" in script
    assert "-m netns -k 'a or b'" in script
    assert script.rstrip().endswith(f"echo $rc > {tmp_path}/rc")
    check = subprocess.run(["sh", "-n"], input=script, capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_results_dir_inside_the_repo_is_put_back_over_the_cached_view() -> None:
    out = Path("/repo/build/vm/6.1.0-56-amd64")
    script = guest_script(Path("/repo"), out, [])
    lines = script.splitlines()
    moved = lines.index(f"  mkdir -p /run/icni-out && mount --move {out} /run/icni-out")
    repo_bind = lines.index("  [ -d $fast/repo ] && mount --bind $fast/repo /repo")
    back = lines.index(f"  mount --bind /run/icni-out {out}")
    assert moved < repo_bind < back
    assert "--move" not in guest_script(Path("/repo"), Path("/tmp/elsewhere"), [])
