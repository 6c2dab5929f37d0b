"""Finding kubelet's UID in a /proc tree, as Istio's native-nftables host probe does."""

from __future__ import annotations

from pathlib import Path

import pytest

from cni_plugin.errors import ConfigError
from cni_plugin.redirection.nftables_host_probe import is_kubelet, kubelet_uid, real_uid


def proc(root: Path, pid: int, comm: str, args: list[str], uid: int) -> None:
    d = root / str(pid)
    d.mkdir()
    (d / "comm").write_text(comm + "\n")
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in args) + b"\0")
    (d / "status").write_text(f"Name:\t{comm}\nUid:\t{uid}\t{uid + 1}\t{uid + 2}\t{uid + 3}\n")


@pytest.mark.parametrize(
    ("comm", "args", "want"),
    [
        ("kubelet", ["/usr/bin/kubelet", "--config=/var/lib/kubelet/config.yaml"], True),
        ("kubelet", ["/opt/bin/KUBELET"], True),
        ("kubelet", ["/usr/bin/other"], False),
        ("kubelite", ["/snap/microk8s/kubelite"], False),
        ("kubelite", ["/snap/microk8s/kubelite", "--kubelet-args-file=x"], True),
        ("k3s", ["k3s", "agent"], True),
        ("sshd", ["kubelet"], False),
    ],
)
def test_is_kubelet(comm: str, args: list[str], want: bool) -> None:
    assert is_kubelet(comm, args) is want


def test_real_uid_is_the_first_uid_field() -> None:
    assert real_uid("Name:\tx\nUid:\t1000\t0\t0\t0\n") == 1000
    assert real_uid("Name:\tx\n") is None


def test_first_kubelet_by_pid_wins(tmp_path: Path) -> None:
    (tmp_path / "self").mkdir()  # non-numeric entries are not processes
    proc(tmp_path, 7, "kubelet", ["/usr/bin/not-it"], 5)  # no kubelet argument
    proc(tmp_path, 12, "bash", ["bash"], 0)
    proc(tmp_path, 40, "kubelet", ["/usr/bin/kubelet"], 1000)
    proc(tmp_path, 41, "k3s", ["k3s", "agent"], 2000)
    assert kubelet_uid(str(tmp_path)) == 1000


def test_no_kubelet_is_a_config_error_naming_the_fix(tmp_path: Path) -> None:
    proc(tmp_path, 3, "bash", ["bash"], 0)
    with pytest.raises(ConfigError, match=r"no kubelet process found.*host's /proc"):
        kubelet_uid(str(tmp_path))
    with pytest.raises(ConfigError, match="cannot list processes"):
        kubelet_uid(str(tmp_path / "missing"))
