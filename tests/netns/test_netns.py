"""Namespace entry on the real kernel: never creates, refuses the host, runs work inside."""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
from collections.abc import Callable

import pytest

from cni_plugin.errors import NetnsError
from cni_plugin.netns import Netns, netns_id, run_in_netns

pytestmark = pytest.mark.netns


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_work_runs_inside_target_and_caller_thread_stays(make_netns: Callable[[str], str]) -> None:
    name = make_netns("entry")
    path = f"/run/netns/{name}"
    before = os.readlink("/proc/thread-self/ns/net")

    def inside() -> tuple[str, str]:
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        return os.readlink("/proc/thread-self/ns/net"), links

    seen, links = run_in_netns(path, inside)
    assert seen == f"net:[{netns_id(path).inode}]"
    assert seen != before
    # A fresh namespace has only loopback: the subprocess inherited the thread's netns.
    assert [ln.split(":")[1].strip() for ln in links.splitlines()] == ["lo"]
    assert os.readlink("/proc/thread-self/ns/net") == before
    assert threading.active_count() == 1


def test_missing_path_is_not_created() -> None:
    fds = _fd_count()
    path = "/run/netns/icnit-does-not-exist"
    with pytest.raises(NetnsError, match="does not exist"):
        run_in_netns(path, lambda: None)
    assert not os.path.exists(path)
    assert _fd_count() == fds


def test_regular_file_is_refused() -> None:
    fds = _fd_count()
    with tempfile.NamedTemporaryFile() as f, pytest.raises(NetnsError, match="not a network"):
        Netns.open(f.name)
    assert _fd_count() == fds


def test_host_namespace_is_refused() -> None:
    with pytest.raises(NetnsError, match="host's own network namespace"):
        run_in_netns("/proc/self/ns/net", lambda: None)


def test_error_inside_propagates_and_fd_closed(make_netns: Callable[[str], str]) -> None:
    name = make_netns("err")
    fds = _fd_count()

    def boom() -> None:
        raise ValueError("inside")

    with pytest.raises(ValueError, match="inside"):
        run_in_netns(f"/run/netns/{name}", boom)
    assert _fd_count() == fds
