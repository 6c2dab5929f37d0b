"""Per-pod rule install, ours vs Istio's own agent code, one interleaved run (issue 18).

``python -m bench.vs_istio_rules [--samples 200] [--ipv4-only] [--chart PATH] [--json OUT]``
as root. Each sample gives every method a fresh network namespace (``lo`` up and a veth
``eth0``, made and deleted outside the timed region); the methods take turns, their order
rotating each sample, so machine drift hits all alike. Timed, per pod:
- **Istio iptables / Istio nftables**: Istio's Go code itself (the driver built by
  :mod:`bench.istio_peer`, a long-lived process like the agent): ``nodeagent.OpenNetns`` +
  ``nodeagent.NetnsDo`` + the pod traffic manager's ``CreateInpodRules`` (state check,
  ``iptables-restore``/``nft`` runs, loopback route, mark rule), configured as
  ``initMeshDataplane`` does with the chart's defaults (DNS capture on, IPv6 on), timed
  inside that process from opening the netns to the rules being in.
- **ours**: ``backend.apply(netns_path, settings)`` of the iptables, nftables and eBPF
  backends in this process (open the netns, check, rules, policy routes), same settings.
Istio's default (iptables) is the baseline of every ratio; ``ours nftables`` is also given
against Istio's native nftables mode.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.chart import Bar, draw
from bench.istio_peer import DEFAULT_VERSION, DRIVER, PeerBuildError, ensure_peer

PREFIX = "icnbench-vsi-"
PIN_ROOT = f"/sys/fs/bpf/icnbench-vsi-{os.getpid()}"
ISTIO_IPT = "Istio iptables"
ISTIO_NFT = "Istio nftables"


class IstioRuleDriver:
    """Istio's in-pod rule code in its own long-lived process (see ``bench.istio_peer``).

    One request at a time: ``add``/``remove`` send a netns path and wait for Istio's
    answer; ``add`` returns the milliseconds Istio's process measured. Closing ends it.
    The process lives in ``node_netns`` (a throwaway namespace standing for the node): at
    start Istio probes the "host" xtables by adding and deleting a test rule there, which
    must never happen in the machine's own namespace.
    """

    def __init__(
        self, exe: Path, *, node_netns: str, ipv6: bool, nftables: bool, log: Path
    ) -> None:
        self._log = open(log, "ab")  # noqa: SIM115 (closed in close())
        argv = ["nsenter", f"--net={node_netns}", str(exe)]
        argv += [f"-ipv6={str(ipv6).lower()}", f"-nftables={str(nftables).lower()}"]
        self._proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True
        )
        first = self._read()
        if first != "ready":
            self.close()
            raise RuntimeError(f"{exe.name} did not start: {first} (log: {log})")

    def _read(self) -> str:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        return line.strip() if line else f"exited {self._proc.poll()}"

    def _ask(self, verb: str, netns_path: str) -> str:
        assert self._proc.stdin is not None
        self._proc.stdin.write(f"{verb} {netns_path}\n")
        self._proc.stdin.flush()
        answer = self._read()
        if not answer.startswith("ok "):
            raise RuntimeError(f"Istio's {verb} in {netns_path} failed: {answer}")
        return answer[3:]

    def add(self, netns_path: str) -> float:
        return int(self._ask("add", netns_path)) / 1e6

    def remove(self, netns_path: str) -> None:
        self._ask("del", netns_path)

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._log.close()


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def fresh_pod_netns() -> str:
    """A new namespace like a pod's after the primary CNI: lo up, an ``eth0`` veth up."""
    name = f"{PREFIX}{secrets.token_hex(4)}"
    _sh("ip", "netns", "add", name)
    try:
        _sh("ip", "-n", name, "link", "set", "lo", "up")
        _sh("ip", "-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", "e1")
        _sh("ip", "-n", name, "link", "set", "eth0", "up")
    except subprocess.CalledProcessError:
        delete_netns(name)
        raise
    return name


def delete_netns(name: str) -> None:
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def measure(
    methods: dict[str, Callable[[str], float]],
    cleanup: dict[str, Callable[[str], None]],
    samples: int,
) -> dict[str, list[float]]:
    """``samples`` rounds; each method once per round on its own fresh namespace."""
    times: dict[str, list[float]] = {m: [] for m in methods}
    names = list(methods)
    for i in range(samples):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            ns = fresh_pod_netns()
            path = f"/run/netns/{ns}"
            try:
                times[name].append(methods[name](path))
                if name in cleanup:
                    cleanup[name](path)  # state that lives outside the namespace (bpf pins)
            finally:
                delete_netns(ns)
    return times


def _ours(backend: Any, settings: Any) -> Callable[[str], float]:
    def install(path: str) -> float:
        t = time.perf_counter()
        backend.apply(path, settings)
        return (time.perf_counter() - t) * 1000

    return install


def run(samples: int, ipv6: bool, version: str, workdir: Path) -> dict[str, Any]:
    from cni_plugin.redirection.iptables_backend import IptablesBackend
    from cni_plugin.redirection.registry import make_backend
    from cni_plugin.redirection.settings import RedirectSettings

    peer = ensure_peer(version)
    settings = RedirectSettings(dns_capture=True, ipv6=ipv6)
    ebpf = make_backend("ebpf", pin_root=PIN_ROOT, cache_dir=str(workdir / "bpf-cache"))
    ours_ipt = IptablesBackend()
    node = fresh_pod_netns()  # Istio's "host": its start-up probe rules land here
    drivers: list[IstioRuleDriver] = []
    try:
        for mode in ("ipt", "nft"):
            drivers.append(
                IstioRuleDriver(
                    peer.path(DRIVER), node_netns=f"/run/netns/{node}", ipv6=ipv6,
                    nftables=mode == "nft", log=workdir / f"istio-{mode}.log",
                )
            )  # fmt: skip
        ipt, nft = drivers
        methods: dict[str, Callable[[str], float]] = {
            ISTIO_IPT: ipt.add,
            ISTIO_NFT: nft.add,
            "ours iptables": _ours(ours_ipt, settings),
            "ours nftables": _ours(make_backend("nftables"), settings),
            "ours eBPF": _ours(ebpf, settings),
        }
        cleanup = {"ours eBPF": lambda p: ebpf.remove(p, settings)}
        # Warm-up round, not recorded: the eBPF image compiles once per agent start.
        measure(methods, cleanup, 1)
        load = os.getloadavg()
        started = time.time()
        times = measure(methods, cleanup, samples)
    finally:
        for d in drivers:
            d.close()
        delete_netns(node)
        shutil.rmtree(PIN_ROOT, ignore_errors=True)
    istio_log = (workdir / "istio-ipt.log").read_text(errors="replace")
    variants = {
        "ours": ours_ipt.applier.variant,
        "istio": "legacy" if "iptables-legacy-restore" in istio_log else "nft",
    }
    if variants["ours"] != variants["istio"]:
        raise RuntimeError(f"the two used different xtables variants: {variants}")
    return {
        "xtables_variant": variants["ours"],
        "istio_version": peer.version,
        "go": peer.stamp.get("go"),
        "samples": samples,
        "ipv6": ipv6,
        "load_at_start": [round(x, 2) for x in load],
        "seconds": round(time.time() - started, 1),
        "ms": times,
    }


def report(res: dict[str, Any], chart: Path | None) -> str:
    times: dict[str, list[float]] = res["ms"]
    base = statistics.median(times[ISTIO_IPT])
    fams = "IPv4 + IPv6" if res["ipv6"] else "IPv4"
    rows = [
        f"| per-pod rule install, {fams}, DNS capture, {res['samples']} pods each "
        "| median ms | p90 ms | p99 ms | vs Istio iptables |",
        "|---|---:|---:|---:|---:|",
    ]
    bars = []
    for name, xs in times.items():
        med = statistics.median(xs)
        rows.append(
            f"| {name} | {med:.2f} | {pct(xs, 90):.2f} | {pct(xs, 99):.2f} | {med / base:.2f}x |"
        )
        bars.append(Bar(name, med, pct(xs, 90), name.startswith("Istio"), med / base))
    nft_ratio = statistics.median(times["ours nftables"]) / statistics.median(times[ISTIO_NFT])
    rows.append(f"\nours nftables / Istio nftables = {nft_ratio:.2f}x (median)")
    if chart is not None:
        draw(
            chart,
            f"Per-pod rule install ({fams}, DNS capture), median, whisker p90",
            "ms per pod (lower is better)",
            bars,
            note=f"istio.io/istio {res['istio_version']}; {res['samples']} pods each, "
            f"interleaved; load at start {res['load_at_start'][0]}",
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--samples", type=int, default=200, help="pods per method")
    p.add_argument("--ipv4-only", action="store_true")
    p.add_argument("--istio-version", default=DEFAULT_VERSION)
    p.add_argument("--chart", type=Path, help="write the PNG bar chart here")
    p.add_argument("--json", type=Path, help="write the raw samples here")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.vs_istio_rules: run as root (it creates namespaces)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="icnbench-vsi-"))
    try:
        res = run(args.samples, not args.ipv4_only, args.istio_version, workdir)
    except PeerBuildError as e:
        print(f"bench.vs_istio_rules: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"istio.io/istio {res['istio_version']} ({res['go']}); xtables "
        f"{res['xtables_variant']}; load average at start {res['load_at_start']}; "
        f"{res['seconds']} s\n"
    )
    print(report(res, args.chart))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
