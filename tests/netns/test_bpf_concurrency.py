"""Is the eBPF backend safe to call from several agent threads at once? A real stress test:
fresh processes (cold image cache, so concurrent first applies race into the bcc compile
that once corrupted libbcc's heap), 8 namespaces, 8 threads released together, rounds of
apply / check / remove / apply switching settings variants. Each process must exit 0 with
no error and every check as expected; a crash in libbcc shows as a signal exit status.
The agent's decision on its own lock is in ``node_agent.backend_selection.SerialRules``."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.netns.bpf_support import skip_if_unavailable

pytestmark = pytest.mark.netns
REPO = Path(__file__).resolve().parents[2]
THREADS, ROUNDS, PROCESSES = 8, 6, 3


def test_concurrent_applies_on_cold_processes(
    make_netns: Callable[[str], str], tmp_path: Path
) -> None:
    skip_if_unavailable()
    paths = []
    for _ in range(THREADS):
        ns = make_netns("bpfstress")
        # an Ethernet interface, so every pod gets filters on lo and eth0 both ways
        subprocess.run(
            ["ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "p0"],
            check=True,
        )
        paths.append(f"/run/netns/{ns}")
    pin_root = Path(f"/sys/fs/bpf/icnit-stress-{secrets.token_hex(4)}")
    results = []
    try:
        for i in range(PROCESSES):
            cache = tmp_path / f"cache-{i}"  # cold: every process compiles
            proc = subprocess.run(
                [sys.executable, "-m", "tests.netns.bpf_stress", str(pin_root), str(cache),
                 str(ROUNDS), *paths],
                capture_output=True, text=True, timeout=600, cwd=REPO,
            )  # fmt: skip
            assert proc.returncode == 0, f"stress process {i}: rc {proc.returncode}\n{proc.stderr}"
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            assert res["errors"] == [] and res["bad_checks"] == [], res
            assert res["applies"] == THREADS * ROUNDS
            assert len(list(cache.glob("redirect-*.json"))) == 1, "one compile per process"
            results.append(res)
        print("stress:", results)
        assert not list((pin_root / "pods").iterdir())  # every pod removed again
    finally:
        shutil.rmtree(pin_root, ignore_errors=True)
    assert not pin_root.exists()
