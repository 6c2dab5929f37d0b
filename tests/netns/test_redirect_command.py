"""``istio-cni-agent redirect`` end to end, as an operator runs it (real subprocess)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest

from tests.time_scale import scaled

pytestmark = pytest.mark.netns

AGENT = [sys.executable, "-m", "node_agent.cli", "redirect"]


def agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AGENT, *args], capture_output=True, text=True, timeout=scaled(60))


@pytest.mark.parametrize("applier", ["iptables-restore", "python-iptables"])
def test_apply_check_tamper_remove(make_netns: Callable[[str], str], applier: str) -> None:
    ns = make_netns("cli")
    path = f"/run/netns/{ns}"
    flags = ["--netns", path, "--applier", applier, "--dns-capture"]
    assert agent("check", *flags).returncode == 1
    done = agent("apply", *flags)
    assert done.returncode == 0, done.stderr
    assert applier in done.stdout
    assert agent("check", *flags).returncode == 0
    subprocess.run(["ip", "-n", ns, "rule", "del", "pref", "32764"], check=True)
    tampered = agent("check", *flags)
    assert tampered.returncode == 1
    assert "missing: ip rule fwmark 0x111/0xfff lookup 100 pref 32764" in tampered.stdout
    assert agent("apply", *flags).returncode == 0
    assert agent("check", *flags).returncode == 0
    assert agent("remove", *flags).returncode == 0
    gone = agent("check", *flags)
    assert gone.returncode == 1 and "extra:" not in gone.stdout


def test_bad_netns_is_one_line_and_non_zero(tmp_path: object) -> None:
    done = agent("apply", "--netns", "/run/netns/icnit-no-such-namespace")
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "does not exist" in done.stderr
    assert "Traceback" not in done.stderr
    host = agent("apply", "--netns", "/proc/self/ns/net")
    assert host.returncode == 1 and "host's own network namespace" in host.stderr
