"""Tear a testbed node down completely, with or without a state file (crash recovery).

Role: find everything a node made by its well-known names and by namespace identity, not
only by what a state file says, and remove it in dependency order:

1. processes: recorded daemon pids; every process whose mount or network namespace is the
   node's (containerd shims, the agent, strays); every process in the node's cgroup root
   (containers) -- SIGTERM, short grace, SIGKILL;
   then the instance's ebpf pin root (``Layout.bpf_pin_root``), whatever a crash left;
2. cgroups: ``<hierarchy>/icni-tb`` in every hierarchy, depth-first;
3. mounts: the mount-namespace file and its private self-bind, anything else under the state
   dir in the host's mount table;
4. the node network namespace (``ip netns del``), which frees bridge, veths and pod netns;
5. the state dir (only once nothing is mounted under it).

Each step reports what it could not remove instead of raising, so a partial failure still
removes everything else; :func:`leftovers` lists what remains (empty = clean).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from testbed.layout import Layout


def _ns_inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _ns_of(pid: int, kind: str) -> int | None:
    try:
        link = os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return None
    return int(link.split("[", 1)[1].rstrip("]")) if "[" in link else None


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    if state == "Z":
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)  # our own child: reap it
        return False
    return True


def _cgroup_tree(root: Path) -> list[Path]:
    """Every directory under ``root`` (itself included), deepest first. Cgroups vanish while
    we look (kubelet and runc remove them), so a vanished directory is simply skipped."""
    dirs: list[Path] = []
    for parent, _subdirs, _files in os.walk(root, onerror=lambda _e: None):
        dirs.append(Path(parent))
    return sorted(dirs, key=lambda d: -len(d.parts))


def _cgroup_pids(layout: Layout) -> set[int]:
    found: set[int] = set()
    for root in layout.cgroup_dirs():
        for d in _cgroup_tree(root):
            with contextlib.suppress(OSError, ValueError):
                found.update(int(x) for x in (d / "cgroup.procs").read_text().split())
    return found


def node_processes(layout: Layout, recorded: list[int] | None = None) -> set[int]:
    """Every live process belonging to the node (never this process itself)."""
    me = os.getpid()
    mnt, net = _ns_inode(layout.mnt_ns), _ns_inode(layout.node_netns)
    found = {p for p in recorded or [] if alive(p)}
    if mnt is not None or net is not None:
        for pid in _pids():
            if pid == me:
                continue
            if (mnt is not None and _ns_of(pid, "mnt") == mnt) or (
                net is not None and _ns_of(pid, "net") == net
            ):
                found.add(pid)
    found |= _cgroup_pids(layout)
    found.discard(me)
    return {p for p in found if alive(p)}


def kill_processes(layout: Layout, recorded: list[int], grace: float = 5.0) -> list[str]:
    targets = node_processes(layout, recorded)
    for pid in targets:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        targets = {p for p in targets if alive(p)} | node_processes(layout)
        if not targets:
            return []
        time.sleep(0.1)
    for _ in range(3):
        for pid in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.3)
        targets = {p for p in targets if alive(p)} | node_processes(layout)
        if not targets:
            return []
    return [f"process {p} still alive" for p in sorted(targets)]


def remove_cgroups(layout: Layout) -> list[str]:
    problems: list[str] = []
    for root in layout.cgroup_dirs():
        for d in _cgroup_tree(root):
            for _ in range(20):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)  # processes may take a moment to leave
            else:
                problems.append(f"cgroup {d} not removable")
    return problems


def mounts_under(path: Path) -> list[str]:
    prefix = str(path)
    out: list[str] = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mp = line.split()[4].replace("\\040", " ")
        if mp == prefix or mp.startswith(prefix + "/"):
            out.append(mp)
    return out


def unmount_all(layout: Layout) -> list[str]:
    for _ in range(3):
        mps = mounts_under(layout.state_dir)
        if not mps:
            return []
        for mp in sorted(mps, key=len, reverse=True):
            subprocess.run(["umount", "-l", mp], capture_output=True)
    return [f"mount {m} remains" for m in mounts_under(layout.state_dir)]


def remove_netns(layout: Layout) -> list[str]:
    if not layout.node_netns.exists():
        return []
    subprocess.run(["ip", "netns", "del", layout.netns_name], capture_output=True)
    if layout.node_netns.exists():
        return [f"netns {layout.node_netns} remains"]
    return []


def recorded_pids(layout: Layout) -> list[int]:
    """Pids from the pid file (written at each launch) and the state file, plus the host-side
    loopback forwarder found by its command line (it is in no node namespace)."""
    pids: set[int] = set()
    for f in (layout.pids_file, layout.state_file):
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        pids.update(
            int(p)
            for p in (data.get("pids", data) if isinstance(data, dict) else {}).values()
            if isinstance(p, int)
        )
    marker = f"--port-file={layout.forward_port_file}".encode()
    for pid in _pids():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"testbed.forward" in cmd and marker in cmd:
            pids.add(pid)
    return sorted(pids)


def remove_bpf_pins(layout: Layout) -> list[str]:
    """The instance's ebpf pin root (programs, maps, per-pod state, the getsockopt link on
    the host's cgroup root). Removing a pin drops the object once no process holds it, and
    the node's processes are gone by now, so the link detaches as its pin goes."""
    root = layout.bpf_pin_root
    if not root.exists():
        return []
    shutil.rmtree(root, ignore_errors=True)
    return [f"bpffs {root} remains"] if root.exists() else []


def teardown(layout: Layout) -> list[str]:
    """Remove everything of the node; returns a list of problems (empty = all gone)."""
    problems = kill_processes(layout, recorded_pids(layout))
    problems += remove_bpf_pins(layout)
    problems += remove_cgroups(layout)
    problems += unmount_all(layout)
    problems += remove_netns(layout)
    if not mounts_under(layout.state_dir):
        shutil.rmtree(layout.state_dir, ignore_errors=True)
    if layout.state_dir.exists():
        problems.append(f"state dir {layout.state_dir} remains")
    return problems


def leftovers(layout: Layout) -> list[str]:
    """What of the node still exists (for tests and ``status``)."""
    procs = node_processes(layout, recorded_pids(layout))
    out: list[str] = [f"process {p}" for p in sorted(procs)]
    out += [f"cgroup {d}" for d in layout.cgroup_dirs() if d.exists()]
    out += [f"mount {m}" for m in mounts_under(layout.state_dir)]
    if layout.node_netns.exists():
        out.append(f"netns {layout.node_netns}")
    if layout.bpf_pin_root.exists():
        out.append(f"bpffs {layout.bpf_pin_root}")
    if layout.state_dir.exists():
        out.append(f"dir {layout.state_dir}")
    return out
