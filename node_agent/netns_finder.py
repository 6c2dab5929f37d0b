"""Finding running pods' network namespaces through /proc, without a runtime API (SPEC §4).

Walk ``<proc_root>/<pid>``: skip processes in the host's namespace (same dev/inode as the
configured reference, by default our own ``/proc/self/ns/net``) and namespaces already
seen, read ``<pid>/cgroup``, take the pod UID from a ``pod<uid>`` path segment (``-`` or
``_`` separators, plain, ``.slice``/``.scope`` names; CRI-O ``crio-<id>`` scopes sit under
such a pod slice), normalise it to dashes. When several processes map to one pod, the one
with the oldest start time (``stat`` field 22) wins. Opening goes through
:class:`cni_plugin.netns.Netns`, which never creates a namespace.
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass

from cni_plugin.netns import Netns, NetnsId

# pod<uid> where uid is 32 hex digits in 8-4-4-4-12 groups joined by '-' or '_', as a whole
# path segment ("pod<uid>") or the tail of a systemd slice name ("kubepods-...-pod<uid>.slice").
_POD_UID = re.compile(
    r"(?:^|[/\-_])pod([0-9a-f]{8})[-_]([0-9a-f]{4})[-_]([0-9a-f]{4})[-_]([0-9a-f]{4})[-_]"
    r"([0-9a-f]{12})(?=$|/|\.slice|\.scope)",
    re.IGNORECASE,
)


def pod_uid_from_cgroup(text: str) -> str | None:
    """The pod UID named by a ``/proc/<pid>/cgroup`` file's paths, or None."""
    for line in text.splitlines():
        m = _POD_UID.search(line.split(":", 2)[-1])
        if m:
            return "-".join(g.lower() for g in m.groups())
    return None


def start_time(stat_text: str) -> int:
    """Field 22 (starttime, clock ticks since boot) of ``/proc/<pid>/stat``."""
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    rest = stat_text[stat_text.rindex(")") + 2 :].split()
    return int(rest[22 - 3])


@dataclass(frozen=True)
class FoundNetns:
    uid: str
    pid: int
    path: str  # <proc_root>/<pid>/ns/net
    ident: NetnsId
    start: int


class NetnsFinder:
    """Scans ``proc_root`` for pod namespaces. ``host_netns`` is the reference namespace
    path whose dev/inode is never a pod's (config, else our own)."""

    def __init__(
        self,
        proc_root: str = "/host/proc",
        host_netns: str = "/proc/self/ns/net",
        reuse_seconds: float = 2.0,
    ) -> None:
        self.proc_root = proc_root
        self.host_netns = host_netns
        # find() shares one walk among concurrent and closely following callers (a namespace
        # labelled with hundreds of running pods would otherwise walk /proc once per pod).
        self.reuse_seconds = reuse_seconds
        self._lock = threading.Lock()
        self._recent: dict[str, FoundNetns] = {}
        self._recent_at = 0.0
        self.scans = 0

    def _host_id(self) -> NetnsId | None:
        try:
            st = os.stat(self.host_netns)
        except OSError:
            return None
        return NetnsId(st.st_dev, st.st_ino)

    def scan(self, wanted: set[str] | None = None) -> dict[str, FoundNetns]:
        """Map pod UID -> its namespace for every pod process found (or only ``wanted``)."""
        self.scans += 1
        host = self._host_id()
        seen: set[NetnsId] = set()
        found: dict[str, FoundNetns] = {}
        try:
            pids = [int(n) for n in os.listdir(self.proc_root) if n.isdigit()]
        except OSError:
            return found
        for pid in pids:
            base = os.path.join(self.proc_root, str(pid))
            ns_path = os.path.join(base, "ns", "net")
            try:
                st = os.stat(ns_path)
            except OSError:
                continue  # exited, or a kernel thread
            ident = NetnsId(st.st_dev, st.st_ino)
            if ident == host or ident in seen:
                continue
            try:
                with open(os.path.join(base, "cgroup")) as f:
                    uid = pod_uid_from_cgroup(f.read())
                if uid is None or (wanted is not None and uid not in wanted):
                    continue
                with open(os.path.join(base, "stat")) as f:
                    started = start_time(f.read())
            except (OSError, ValueError, IndexError):
                continue
            seen.add(ident)
            cand = FoundNetns(uid, pid, ns_path, ident, started)
            prev = found.get(uid)
            if prev is None or cand.start < prev.start:
                found[uid] = cand
        return found

    def find(self, uid: str) -> FoundNetns | None:
        """The pod's namespace, from a walk at most ``reuse_seconds`` old when that walk saw
        the pod and its process is still in the same namespace; else from a fresh walk."""
        with self._lock:
            hit = self._recent.get(uid)
            if hit is not None and time.monotonic() - self._recent_at < self.reuse_seconds:
                try:
                    st = os.stat(hit.path)
                except OSError:
                    st = None
                if st is not None and NetnsId(st.st_dev, st.st_ino) == hit.ident:
                    return hit
            self._recent = self.scan()
            self._recent_at = time.monotonic()
            return self._recent.get(uid)


class HostCheckedOpener:
    """Opens pod namespaces for the agent: never ``host_netns`` (the host's own), never by
    creating one (:meth:`cni_plugin.netns.Netns.open`)."""

    def __init__(self, host_netns: str) -> None:
        self.host_netns = host_netns

    def open(self, path: str) -> Netns:
        return Netns.open(path, host_netns=self.host_netns)
