"""Per-pod install time of the iptables backend's two appliers, same run.

Each sample gets a fresh network namespace per applier (created and deleted outside the
timed region; appliers interleaved, order alternating, so machine drift hits both alike).
Timed: entering the namespace on a short-lived thread and installing the full in-pod rule
set of the default settings (DNS capture on, IPv4 and, unless ``--ipv4-only``, IPv6) with
- ``python-iptables``: libiptc in process (:class:`PythonIptablesApplier`);
- ``iptables-restore``: ``<family>-<variant>-restore --noflush`` subprocesses in the
  namespace (:class:`IptablesRestoreApplier`, the host's variant).
``--backend`` also times the whole ``IptablesBackend.apply`` (check first, rules, routes).

Run as root: ``.venv/bin/python -m bench.iptables_install [--samples 200] [--ipv4-only]``.
Namespaces are named ``icnbench-ipt-*`` and always removed.
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

from cni_plugin.netns import run_in_netns
from cni_plugin.redirection.iptables_backend import IptablesBackend, RuleApplier, make_applier
from cni_plugin.redirection.iptables_rules import families, inpod_rules
from cni_plugin.redirection.settings import RedirectSettings

PREFIX = "icnbench-ipt-"


def _fresh_netns() -> str:
    name = f"{PREFIX}{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    return name


def _delete_netns(name: str) -> None:
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _rules_only(applier: RuleApplier, settings: RedirectSettings) -> Callable[[str], None]:
    rulesets = [inpod_rules(settings, f) for f in families(settings)]

    def install(path: str) -> None:
        def work() -> None:
            for rs in rulesets:
                applier.install(rs)

        run_in_netns(path, work)

    return install


def _whole_apply(backend: IptablesBackend, settings: RedirectSettings) -> Callable[[str], None]:
    return lambda path: backend.apply(path, settings)


def measure(methods: dict[str, Callable[[str], None]], samples: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {m: [] for m in methods}
    order = list(methods)
    for i in range(samples):
        for name in order if i % 2 == 0 else reversed(order):
            ns = _fresh_netns()
            try:
                start = time.perf_counter()
                methods[name](f"/run/netns/{ns}")
                times[name].append((time.perf_counter() - start) * 1000)
            finally:
                _delete_netns(ns)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--samples", type=int, default=200, help="namespaces per applier")
    parser.add_argument("--ipv4-only", action="store_true", help="install IPv4 rules only")
    parser.add_argument("--backend", action="store_true", help="also time the whole apply")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.iptables_install: run as root (it creates namespaces)", file=sys.stderr)
        return 2
    settings = RedirectSettings(dns_capture=True, ipv6=not args.ipv4_only)
    restore = make_applier("iptables-restore")
    methods: dict[str, Callable[[str], None]] = {
        "python-iptables": _rules_only(make_applier("python-iptables"), settings),
        f"iptables-restore ({restore.variant})": _rules_only(restore, settings),
    }
    if args.backend:
        for name in ("python-iptables", "iptables-restore"):
            methods[f"IptablesBackend.apply, {name}"] = _whole_apply(
                IptablesBackend(name), settings
            )
    times = measure(methods, args.samples)
    base = statistics.median(times[f"iptables-restore ({restore.variant})"])
    fams = "IPv4" if args.ipv4_only else "IPv4 + IPv6"
    n_rules = sum(len(inpod_rules(settings, f).rules) for f in families(settings))
    print(f"| {fams}, {n_rules} rules, {args.samples} namespaces each | median ms | p90 ms "
          "| vs iptables-restore |")  # fmt: skip
    print("|---|---:|---:|---:|")
    for name, samples in times.items():
        med = statistics.median(samples)
        p90 = statistics.quantiles(samples, n=10)[-1]
        print(f"| {name} | {med:.2f} | {p90:.2f} | {med / base:.2f}x |")
    ratio = statistics.median(times["python-iptables"]) / base
    print(f"\npython-iptables : iptables-restore = {ratio:.2f} : 1 (median)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
