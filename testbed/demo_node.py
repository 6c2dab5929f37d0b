"""What the demo looks at on the machine itself: inside pods, on the node, on the host.

Role: read-only observations for :mod:`testbed.demo`.
- a pod's network namespace (``/proc/<pid>/ns/net`` of a process in its ``pod<uid>``
  cgroup) and commands run in it (``ss -lntu``, the redirection state of each backend);
- the node-side veth of a pod (for :mod:`testbed.demo_capture`);
- :class:`HostSnapshot`: the real host's ``ip netns`` list, ruleset (``iptables-save``,
  legacy and nft, and ``nft list ruleset``), ``/sys/fs/bpf`` and processes, taken before
  and after, so the demo can show the machine was left as it was found.

Nothing here changes anything; every command runs inside a pod's or the node's namespace,
except the host snapshot, which only lists.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.layout import Layout


class ObservationError(RuntimeError):
    """Something the demo needs to look at is not there; the message says what."""


def _run(argv: list[str], timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def pod_pid(layout: Layout, uid: str) -> int:
    """A live process of pod ``uid`` (any: they share the pod's network namespace)."""
    for root in layout.cgroup_dirs():
        try:
            # cgroups of exec'd or exiting processes come and go while we walk
            for d in sorted(root.glob(f"kubepods/**/pod{uid}")):
                for procs in sorted(d.rglob("cgroup.procs")):
                    for pid in procs.read_text().split():
                        if Path(f"/proc/{pid}/ns/net").exists():
                            return int(pid)
        except OSError:
            continue
    raise ObservationError(f"no process of pod {uid} under {layout.cgroup_root}: is it running?")


def in_pod(pid: int, argv: list[str]) -> str:
    """Run ``argv`` (a host binary) in the network namespace of ``pid``; its stdout."""
    proc = _run(["nsenter", f"--net=/proc/{pid}/ns/net", "--", *argv])
    if proc.returncode != 0:
        raise ObservationError(f"{' '.join(argv)} in pod (pid {pid}): {proc.stderr.strip()}")
    return proc.stdout


def listeners(pid: int) -> str:
    """``ss -lntu`` inside the pod."""
    return in_pod(pid, ["ss", "-lntu"])


def listening_ports(ss_output: str) -> dict[str, list[int]]:
    """``{"tcp": [...], "udp": [...]}`` local ports from ``ss -lntu`` output."""
    out: dict[str, set[int]] = {"tcp": set(), "udp": set()}
    for line in ss_output.splitlines()[1:]:
        cols = line.split()
        if len(cols) >= 5 and cols[0] in out:
            port = cols[4].rsplit(":", 1)[-1]
            if port.isdigit():
                out[cols[0]].add(int(port))
    return {k: sorted(v) for k, v in out.items()}


def redirection_state(pid: int, backend: str) -> list[str]:
    """The lines in the pod's namespace that belong to ambient redirection: ISTIO chains
    (iptables, both variants), Istio's nft tables, tc BPF filters on eth0, the policy
    rules of the ztunnel mark. Empty = nothing installed."""
    found: list[str] = []
    for save in ("iptables-save", "iptables-legacy-save", "ip6tables-save"):
        out = in_pod(pid, [save])
        found += [f"{save}: {ln}" for ln in out.splitlines() if "ISTIO" in ln]
    nft = in_pod(pid, ["nft", "list", "tables"])
    found += [f"nft: {ln}" for ln in nft.splitlines() if "istio" in ln.lower()]
    for hook in ("ingress", "egress"):
        tc = _run(["nsenter", f"--net=/proc/{pid}/ns/net", "--", "tc", "filter", "show",
                   "dev", "eth0", hook]).stdout  # fmt: skip
        found += [f"tc {hook}: {ln.strip()}" for ln in tc.splitlines() if "bpf" in ln]
    rules = in_pod(pid, ["ip", "rule"])
    found += [f"ip rule: {ln.strip()}" for ln in rules.splitlines() if "0x111" in ln]
    return found


def node_veth(node_netns: str, pid: int) -> str:
    """The node-side name of the veth whose other end is the pod's ``eth0``."""
    link = json.loads(in_pod(pid, ["ip", "-j", "link", "show", "eth0"]))[0]
    peer = link.get("link_index")
    if peer is None:
        raise ObservationError(f"pod eth0 has no peer ifindex: {link}")
    out = _run(["ip", "-n", Path(node_netns).name, "-j", "link", "show"]).stdout
    for item in json.loads(out or "[]"):
        if item.get("ifindex") == peer:
            return str(item["ifname"])
    raise ObservationError(f"no link with ifindex {peer} in the node namespace")


@dataclass(frozen=True)
class HostSnapshot:
    """The real host as seen by an operator: namespaces, rules, bpffs, processes."""

    netns: tuple[str, ...]
    rules: dict[str, str]
    bpffs: tuple[str, ...]
    pids: frozenset[int]

    @classmethod
    def take(cls) -> HostSnapshot:
        rules: dict[str, str] = {}
        for argv in (["iptables-save"], ["iptables-legacy-save"], ["ip6tables-save"],
                     ["nft", "list", "ruleset"]):  # fmt: skip
            proc = _run(argv)
            rules[" ".join(argv)] = _without_noise(proc.stdout)
        netns = tuple(sorted(ln.split()[0] for ln in _run(["ip", "netns"]).stdout.splitlines()
                             if ln.strip()))  # fmt: skip
        bpf: list[str] = []
        for dirpath, dirs, files in os.walk("/sys/fs/bpf"):
            bpf += [os.path.join(dirpath, n) for n in dirs + files]
        pids = frozenset(int(p) for p in os.listdir("/proc") if p.isdigit())
        return cls(netns, rules, tuple(sorted(bpf)), pids)


def _without_noise(text: str) -> str:
    """Drop what changes without anyone touching the rules: comments with timestamps and
    packet/byte counters."""
    lines = [ln for ln in text.splitlines() if not ln.startswith("#")]
    return "\n".join(re.sub(r"\[\d+:\d+\]", "[0:0]", ln) for ln in lines)


def leftovers(
    before: HostSnapshot, after: HostSnapshot, markers: tuple[str, ...]
) -> dict[str, list[str]]:
    """What the demo left: host rules that changed, and namespaces, bpffs entries and live
    processes that were not there before and mention one of ``markers`` (the node's name,
    its state dir, the agent's pin root) in their name, command line or environment.
    Filtering by marker keeps other people's work on a shared machine out of the answer."""

    def ours(text: str) -> bool:
        return any(m in text for m in markers)

    changed = [k for k in before.rules if before.rules[k] != after.rules.get(k)]
    procs: list[str] = []
    for pid in sorted(after.pids - before.pids):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            env = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
        except OSError:
            continue  # gone meanwhile
        if ours(cmd) or ours(env):
            procs.append(f"{pid} {cmd.strip()[:120]}")
    return {
        "netns": sorted(n for n in set(after.netns) - set(before.netns) if ours(n)),
        "host_rules_changed": changed,
        "bpffs": sorted(b for b in set(after.bpffs) - set(before.bpffs) if ours(b)),
        "processes": procs,
    }


def agent_processes(node_netns: Path) -> list[dict[str, Any]]:
    """Every ``istio-cni-agent`` process in the node's network namespace with the root it
    sees: in a container it is the image's root filesystem, never the host's ``/``."""
    want = node_netns.stat().st_ino
    out: list[dict[str, Any]] = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if not any(a.endswith(b"istio-cni-agent") for a in argv[:2]):
                continue
            if (proc / "ns" / "net").stat().st_ino != want:
                continue
            root = (proc / "root").stat()
        except OSError:
            continue
        # the magic link resolves into the process's own root: compare it with ours
        host = Path("/").stat()
        same = (root.st_dev, root.st_ino) == (host.st_dev, host.st_ino)
        out.append({"pid": int(proc.name), "argv": [a.decode() for a in argv if a],
                    "host_root": same})  # fmt: skip
    return out
