"""Pins of pods that went away without a CNI DEL: found and deleted by the reconciler.

The eBPF backend keeps per-pod pins under ``<pin_root>/pods/<netns inode>``. A pod deleted
while the agent was down, or whose sandbox vanished without ``remove``, leaves them behind
(they hold its programs' references and the state map, nothing on the data path). Each
reconcile pass lists the pinned inodes first, then every network namespace still alive on
the host (processes under ``proc_root``, bind mounts under ``netns_dir``, namespaces the
agent holds open), and deletes the pins whose namespace is not among them. Listing the pins
first means a pod enrolled meanwhile is never a candidate. An unreadable proc root raises
(the reconciler logs it): pruning against an empty view would delete every pod's pins.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable
from typing import Protocol

log = logging.getLogger("node_agent.bpf_pins")


class PodPins(Protocol):
    def pinned_pods(self) -> set[int]: ...

    def prune(
        self, live_netns_inodes: set[int], candidates: set[int] | None = None
    ) -> list[int]: ...


def live_netns_inodes(proc_root: str, netns_dir: str) -> set[int]:
    """Inodes of every network namespace a process (or a thread) is in, or that is bind
    mounted under ``netns_dir``. Unreadable entries (processes exiting) are skipped."""
    found: set[int] = set()
    for pid in os.listdir(proc_root):
        if not pid.isdigit():
            continue
        paths = [f"{proc_root}/{pid}/ns/net"]
        with contextlib.suppress(OSError):
            paths += [
                f"{proc_root}/{pid}/task/{t}/ns/net" for t in os.listdir(f"{proc_root}/{pid}/task")
            ]
        for path in paths:
            try:
                found.add(os.stat(path).st_ino)
            except OSError:
                continue
    try:
        names = os.listdir(netns_dir)
    except OSError:
        names = []
    for name in names:
        try:
            found.add(os.stat(os.path.join(netns_dir, name)).st_ino)
        except OSError:
            continue
    return found


class PinPruner:
    """One pruning pass over the backend's pod pins; called by the reconciler."""

    def __init__(
        self,
        pins: PodPins,
        proc_root: str,
        netns_dir: str,
        held: Callable[[], Iterable[int | None]] = lambda: (),
    ) -> None:
        self.pins = pins
        self.proc_root = proc_root
        self.netns_dir = netns_dir
        self.held = held  # namespaces the agent holds open (its pod cache)

    def run(self) -> list[int]:
        candidates = self.pins.pinned_pods()
        if not candidates:
            return []
        live = live_netns_inodes(self.proc_root, self.netns_dir)
        live |= {i for i in self.held() if i is not None}
        pruned = self.pins.prune(live, candidates)
        if pruned:
            log.info(
                "deleted the pins of pods whose namespace is gone",
                extra={"fields": {"netns_inodes": pruned}},
            )
        return pruned
