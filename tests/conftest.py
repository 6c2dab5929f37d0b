"""Shared fixtures. Namespaces made by tests are named ``icnit-<pid>-<tag>-<hex>`` so that a
sweep at session start and end (and on Ctrl-C, via atexit) removes what this run or a
crashed run left, and never a namespace that another live pytest process is still using."""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import subprocess
from collections.abc import Callable, Iterator

import pytest

NETNS_PREFIX = "icnit-"


def _owner(name: str) -> int | None:
    """The pid encoded in a test namespace's name, or None for names of another shape."""
    parts = name[len(NETNS_PREFIX) :].split("-", 1)
    return int(parts[0]) if parts[0].isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_netns(include_own: bool = True) -> None:
    try:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    except FileNotFoundError:
        return
    me = os.getpid()
    for line in out.splitlines():
        name = line.split()[0] if line.strip() else ""
        pid = _owner(name) if name.startswith(NETNS_PREFIX) else None
        if pid is None:
            continue
        if (pid == me and include_own) or (pid != me and not _alive(pid)):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


BPF_FS = "/sys/fs/bpf"
# What bpffs held when this session started: a leftover check tells this run's entries from
# those of concurrent runs or testbeds (tests/netns/test_bpf_node_state.py).
BPF_AT_START: set[str] = set()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Leftover checks run after everything else of the session.
    items.sort(key=lambda item: "after_ebpf_suite" in item.keywords)
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (real network namespaces)")
    for item in items:
        if "netns" in item.keywords or "testbed" in item.keywords:
            item.add_marker(skip)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Istio's own binaries (the peer some netns tests compare with) are built before the
    first test when a module that needs them is selected (``NEEDS_ISTIO_PEER``): a cold
    build takes minutes and must not count against a test's timeout. Progress is shown; a
    failed build is left for the module's fixture to report."""
    if session.config.option.collectonly or os.geteuid() != 0:
        return
    if not any(getattr(item.module, "NEEDS_ISTIO_PEER", False) for item in session.items
               if isinstance(item, pytest.Function)):  # fmt: skip
        return
    from bench.istio_peer import DEFAULT_VERSION, PeerBuildError, ensure_peer, find_peer

    if find_peer(DEFAULT_VERSION) is not None:
        return
    capman = session.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
        print("\nistio peer: building Istio's istio-cni once (cached afterwards)...", flush=True)
        with contextlib.suppress(PeerBuildError):
            ensure_peer()


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.path.isdir(BPF_FS):
        BPF_AT_START.update(os.listdir(BPF_FS))
    if os.geteuid() == 0:
        _sweep_netns(include_own=False)
        atexit.register(_sweep_netns)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.geteuid() == 0:
        _sweep_netns()


@pytest.fixture
def make_netns() -> Iterator[Callable[[str], str]]:
    """Factory for throwaway named network namespaces (``/run/netns/<name>``), removed at
    teardown even when the test fails. Returns the name; the path is ``/run/netns/<name>``."""
    created: list[str] = []

    def make(tag: str = "ns") -> str:
        name = f"{NETNS_PREFIX}{os.getpid()}-{tag}-{secrets.token_hex(3)}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        created.append(name)
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        return name

    yield make
    for name in reversed(created):
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
