"""Per-pod rule install time: libnftables in-process vs iptables-restore, same run.

Each sample gets a fresh network namespace per method (created and deleted outside the
timed region). Timed: entering the namespace on a short-lived thread and installing the
default in-pod rules (DNS capture on), for
- ``libnftables``: a new ``nftables.Nftables()`` context inside the namespace and one
  ``cmd()`` of the nft text (what :class:`NftablesBackend` does for its rules);
- ``iptables-<variant>-restore``: ``iptables-restore --noflush`` (and ``ip6tables-restore``
  for IPv6) as a subprocess inside the namespace, fed Istio 1.24's golden text (what the
  iptables backend does for its rules);
- the full ``apply`` of the nftables and the iptables (iptables-restore) backends, i.e.
  rules + policy routes + each backend's own bookkeeping.

Run as root: ``.venv/bin/python -m bench.nftables_install [--samples 200] [--ipv6]``.
Namespaces are named ``icnbench-*`` and always removed.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import nftables

from cni_plugin.netns import run_in_netns
from cni_plugin.redirection.backend import RedirectionBackend
from cni_plugin.redirection.nftables_backend import NftablesBackend
from cni_plugin.redirection.nftables_rules import inpod_ruleset
from cni_plugin.redirection.registry import make_backend
from cni_plugin.redirection.settings import RedirectSettings

REFERENCE = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference"
PREFIX = "icnbench-"


def _iptables_halves(ipv6: bool) -> list[tuple[str, str]]:
    """(command family, restore text) from Istio 1.24's default golden: the ``_ipv6`` file
    holds the IPv4 tables then the IPv6 tables (three COMMITs each)."""
    name = "default_ipv6.golden" if ipv6 else "default.golden"
    text = (REFERENCE / "istio-1.24" / "iptables" / name).read_text()
    blocks, current = [], []
    for line in text.splitlines():
        current.append(line)
        if line == "COMMIT":
            blocks.append("\n".join(current) + "\n")
            current = []
    v4 = "".join(blocks[:3])
    halves = [("iptables", v4)]
    if ipv6:
        halves.append(("ip6tables", "".join(blocks[3:])))
    return halves


def _fresh_netns() -> str:
    name = f"{PREFIX}{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    return name


def _time_in_fresh_netns(install: Callable[[], None]) -> float:
    name = _fresh_netns()
    try:
        start = time.perf_counter()
        run_in_netns(f"/run/netns/{name}", install)
        return time.perf_counter() - start
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


def _nft_install(text: str) -> Callable[[], None]:
    def install() -> None:
        rc, _, err = nftables.Nftables().cmd(text)
        if rc != 0:
            raise RuntimeError(f"nft failed: {err}")

    return install


def _restore_install(variant: str, halves: list[tuple[str, str]]) -> Callable[[], None]:
    def install() -> None:
        for family, text in halves:
            subprocess.run(
                [f"{family}-{variant}-restore", "--noflush"], input=text, text=True, check=True
            )

    return install


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--ipv6", action="store_true", help="also install the IPv6 rules")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("run as root: the benchmark creates network namespaces", file=sys.stderr)
        return 2

    settings = replace(RedirectSettings(), ipv6=args.ipv6)
    nft_text = inpod_ruleset(settings).text()
    halves = _iptables_halves(args.ipv6)
    backend = NftablesBackend()
    iptables = make_backend("iptables", applier="iptables-restore")

    methods: dict[str, Callable[[], float]] = {
        "libnftables (rules)": lambda: _time_in_fresh_netns(_nft_install(nft_text)),
        "iptables-legacy-restore (rules)": lambda: _time_in_fresh_netns(
            _restore_install("legacy", halves)
        ),
        "iptables-nft-restore (rules)": lambda: _time_in_fresh_netns(
            _restore_install("nft", halves)
        ),
        "NftablesBackend.apply (rules + routes)": lambda: _timed_backend_apply(backend, settings),
        "IptablesBackend.apply, restore (rules + routes)": lambda: _timed_backend_apply(
            iptables, settings
        ),
    }
    samples: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(args.samples):
        for name, measure in methods.items():  # interleaved: drift hits all methods alike
            samples[name].append(measure())

    base = statistics.median(samples["libnftables (rules)"])
    family = "IPv4+IPv6" if args.ipv6 else "IPv4"
    print(f"per-pod install, default rules ({family}), {args.samples} fresh namespaces each")
    print()
    print("| method | median ms | p90 ms | vs libnftables |")
    print("|---|---:|---:|---:|")
    for name, vals in samples.items():
        med = statistics.median(vals)
        p90 = statistics.quantiles(vals, n=10)[-1]
        print(f"| {name} | {med * 1e3:.2f} | {p90 * 1e3:.2f} | {med / base:.2f}x |")
    return 0


def _timed_backend_apply(backend: RedirectionBackend, settings: RedirectSettings) -> float:
    name = _fresh_netns()
    try:
        start = time.perf_counter()
        backend.apply(f"/run/netns/{name}", settings)
        return time.perf_counter() - start
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


if __name__ == "__main__":
    sys.exit(main())
