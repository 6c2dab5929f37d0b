"""Host probe set sync at N pods: one batched sync vs N per-pod adds, same run.

In a throwaway namespace (``icnbench-probe-*``, always removed) with the real ipset tool:
- ``sync, all missing``: :meth:`HostProbe.sync` of N pods into empty sets (start-up
  adoption after a node restart);
- ``sync, unchanged``: the same sync again (every reconcile pass);
- baseline ``N x add``: :meth:`HostProbe.add` once per pod, sequentially (what adoption
  would cost pod by pod).
Prints the three times, the ratio baseline / batched, and the load average before and after.

Run as root: ``.venv/bin/python -m bench.host_probe_sync [--pods 1000]``.
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import time
import uuid

from node_agent.host_probe import HostProbe


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pods", type=int, default=1000)
    n = ap.parse_args().pods
    name = f"icnbench-probe-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        load0 = os.getloadavg()[0]
        ns = f"/run/netns/{name}"
        pods = {
            str(uuid.uuid4()): (f"10.{i // 250}.{i % 250}.{(i * 7) % 250 + 1}",) for i in range(n)
        }
        probe = HostProbe(ipv6=False, node_netns=ns)
        probe.setup()
        t = time.perf_counter()
        probe.sync(pods)
        missing = time.perf_counter() - t
        t = time.perf_counter()
        probe.sync(pods)
        unchanged = time.perf_counter() - t
        probe.teardown()
        base = HostProbe(ipv6=False, node_netns=ns)
        base.setup()
        t = time.perf_counter()
        for uid, ips in pods.items():
            base.add(uid, ips)
        one_by_one = time.perf_counter() - t
        base.teardown()
        load1 = os.getloadavg()[0]
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    print(
        f"pods={n} sync_all_missing_ms={missing * 1000:.0f} sync_unchanged_ms="
        f"{unchanged * 1000:.0f} baseline_{n}x_add_ms={one_by_one * 1000:.0f} "
        f"ratio={one_by_one / missing:.0f}x load={load0:.1f}->{load1:.1f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
