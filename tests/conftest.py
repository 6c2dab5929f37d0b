"""Shared fixtures. Namespaces made by tests carry the prefix ``icnit-`` so that a sweep at
session start and end (and on Ctrl-C, via atexit) removes anything a crashed run left."""

from __future__ import annotations

import atexit
import os
import secrets
import subprocess
from collections.abc import Callable, Iterator

import pytest

NETNS_PREFIX = "icnit-"


def _sweep_netns() -> None:
    try:
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    except FileNotFoundError:
        return
    for line in out.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(NETNS_PREFIX):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (real network namespaces)")
    for item in items:
        if "netns" in item.keywords or "testbed" in item.keywords:
            item.add_marker(skip)


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.geteuid() == 0:
        _sweep_netns()
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
        name = f"{NETNS_PREFIX}{tag}-{secrets.token_hex(3)}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        created.append(name)
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        return name

    yield make
    for name in reversed(created):
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
