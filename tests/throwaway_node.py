"""A throwaway node for running the real node agent outside a cluster: namespaces under a
caller's own prefix (always removed), and the agent configuration that points the agent at
them and at a scratch directory. Shared by the agent netns tests, the plugin-chain tests and
the ambient ADD bench, which all stage the same node."""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from node_agent.config import AgentConfig


@contextmanager
def own_namespaces(prefix: str) -> Iterator[Callable[[str], str]]:
    """Yield ``make(tag)``, which adds a namespace ``<prefix>-<tag>-<hex>`` with lo up and
    returns its name; every one made is deleted on exit, newest first, even on failure.

    A prefix of the caller's own (not the shared ``icnit-``) keeps a concurrent pytest
    session's ``icnit-`` sweep from pulling namespaces out from under a running agent."""
    created: list[str] = []

    def make(tag: str) -> str:
        name = f"{prefix}-{tag}-{secrets.token_hex(3)}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        created.append(name)
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        return name

    try:
        yield make
    finally:
        for name in reversed(created):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def agent_config(tmp: Path, node_netns: str, *, workers: int = 4) -> AgentConfig:
    """The agent of node ``node-1`` with everything under ``tmp`` (run dir ``run``, ztunnel
    socket ``zt/ztunnel.sock``, proc tree ``proc``; none of them created here), host probe
    rules in ``node_netns``, pods' namespaces in /run/netns, HTTP ports chosen by the kernel
    on 127.0.0.1, and no periodic reconcile during a test."""
    return AgentConfig(
        node_name="node-1",
        run_dir=str(tmp / "run"),
        ztunnel_socket=str(tmp / "zt" / "ztunnel.sock"),
        proc_root=str(tmp / "proc"),
        netns_dir="/run/netns",
        node_netns=node_netns,
        health_port=0,
        monitoring_port=0,
        listen_address="127.0.0.1",
        reconcile_seconds=3600,
        workers=workers,
    )
