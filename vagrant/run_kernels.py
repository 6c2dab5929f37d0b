"""Run the redirection test suite on other kernels: ``python -m vagrant.run_kernels``.

    python -m vagrant.run_kernels all                # Debian 6.1 and 6.12 (make vm-test)
    python -m vagrant.run_kernels 6.1                 # newest Debian 6.1 build
    python -m vagrant.run_kernels 6.12.117+deb12-amd64 host -- -m netns -k nft
    python -m vagrant.run_kernels 6.1 --kernel-arg ipv6.disable=1 -- \
        tests/netns/test_host_probe_lifecycle.py -k kernel_without_ipv6

Each kernel is fetched once into the cache (``/var/cache/istio-cni-kernels/<release>``),
booted under qemu TCG over this machine's filesystem, and runs pytest (default
``-m 'netns and not chaos'``; anything after ``--`` replaces that). ``host`` runs the same
selection on this machine's own kernel. ``--kernel-arg`` (repeatable) adds to the guest
kernel's command line; such a run's results go to ``build/vm/<kernel>_<args>/`` ("=" as
"-") so they never overwrite a plain run's.
Results land in ``build/vm/<kernel>/`` (guest.log, junit.xml, summary.json); a
summary is printed, and the exit code is 0 only when every kernel ran tests and none failed.
Kernels run one after another: qemu TCG is CPU-bound and the machine has two cores.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shlex
import signal
import sys
from pathlib import Path

from vagrant.guest_run import DEFAULT_TIMEOUT, run_in_guest, run_on_host
from vagrant.kernel_cache import (
    DEFAULT_ROOT,
    DEFAULT_SERIES,
    AptSource,
    KernelCache,
    KernelCacheError,
)
from vagrant.results import TABLE_HEADER, KernelResult, markdown_rows, result_from_json

REPO = Path(__file__).resolve().parent.parent
# The netns suite without its long soak (marker chaos: tens of minutes on the host, hours
# under TCG).
DEFAULT_PYTEST_ARGS = ["-m", "netns and not chaos"]
# One kernel command-line word: ``name`` or ``name=value``, nothing the shell or vng would split.
_KERNEL_ARG = re.compile(r"[A-Za-z0-9_.-]+(=[A-Za-z0-9_.,:/+-]*)?")


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    pytest_args = DEFAULT_PYTEST_ARGS
    if "--" in argv:
        cut = argv.index("--")
        argv, pytest_args = argv[:cut], argv[cut + 1 :]
    p = argparse.ArgumentParser(
        prog="python -m vagrant.run_kernels",
        description="Run the netns test suite on Debian kernels under qemu (virtme-ng).",
        epilog="Arguments after -- are passed to pytest (default: -m 'netns and not chaos').",
    )
    p.add_argument(
        "kernels",
        nargs="*",
        help="'all' (= 6.1 6.12), a series (6.1), a release (6.12.117+deb12-amd64), or 'host'",
    )
    p.add_argument("--cache", type=Path, default=DEFAULT_ROOT, help="kernel package cache")
    p.add_argument("--out", type=Path, default=REPO / "build" / "vm", help="results directory")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per kernel")
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--memory", default="2G")
    p.add_argument(
        "--nice",
        type=int,
        default=int(os.environ.get("ICNI_VM_NICE", "19")),
        help="qemu's niceness (default 19, or $ICNI_VM_NICE): lower it on an idle machine",
    )
    p.add_argument(
        "--kernel-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="add ARG (e.g. ipv6.disable=1) to the guest kernel's command line; repeatable",
    )
    p.add_argument("--json", type=Path, help="also write every kernel's summary to this file")
    p.add_argument("--markdown", action="store_true", help="print docs/kernels.md table rows")
    p.add_argument(
        "--report",
        action="store_true",
        help="run nothing: print the docs/kernels.md table from OUT/*/summary.json",
    )
    args = p.parse_args(argv)
    # Absolute: the guest runs elsewhere in the tree, and a results dir inside the checkout
    # has to be recognised as such (it is moved back above the cached view of the repo).
    args.out = args.out.resolve()
    if not args.kernels and not args.report:
        p.error("name at least one kernel (or 'all'), or give --report")
    for arg in args.kernel_arg:
        if not _KERNEL_ARG.fullmatch(arg):
            p.error(f"--kernel-arg {arg!r}: give one word or key=value, without spaces or quotes")
    if args.kernel_arg and "host" in args.kernels:
        p.error("--kernel-arg needs a qemu kernel: 'host' runs on this machine's own kernel")
    return args, pytest_args


def _expand(specs: list[str]) -> list[str]:
    out: list[str] = []
    for s in specs:
        out.extend(DEFAULT_SERIES if s == "all" else [s])
    return list(dict.fromkeys(out))


def _print_result(r: KernelResult) -> None:
    t = r.totals
    status = "ok" if r.ok else "FAILED"
    code = "none" if r.exit_code is None else str(r.exit_code)
    print(
        f"{r.kernel} ({r.backend}): {status}: {t.passed} passed, {t.skipped} skipped, "
        f"{t.failed} failed; exit {code}; {r.wall_seconds:.0f} s wall, "
        f"{r.test_seconds:.0f} s in pytest; host load {r.host_load[0]:.1f} -> {r.host_load[1]:.1f}"
    )
    for backend, c in r.by_backend.items():
        print(f"    {backend:9} {c.passed} passed, {c.skipped} skipped, {c.failed} failed")
    for reason, n in r.skip_reasons.items():
        print(f"    skipped x{n}: {reason}")
    for f in r.failures:
        print(f"    failed: {f}")
    if r.missing_modules:
        print(f"    modules not available in this kernel: {' '.join(r.missing_modules)}")
    if r.error:
        print(f"    error: {r.error}")


def _exclusive(out: Path) -> int | None:
    """An flock on ``out/.lock``, held until exit (two runs would clobber each other's
    results), or None when another run holds it."""
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _report(out: Path) -> int:
    summaries = sorted(out.glob("*/summary.json"))
    if not summaries:
        print(f"no results under {out}: run some kernels first", file=sys.stderr)
        return 1
    results = [result_from_json(json.loads(f.read_text())) for f in summaries]
    print("\n".join([*TABLE_HEADER, *markdown_rows(results)]))
    return 0


def main(argv: list[str] | None = None) -> int:
    args, pytest_args = _parse(sys.argv[1:] if argv is None else argv)
    # SIGTERM as an exception, so a running guest's qemu is killed with us (see guest_run).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.report:
        return _report(args.out)
    command = "python -m vagrant.run_kernels " + shlex.join(args.kernels)
    for arg in args.kernel_arg:
        command += f" --kernel-arg {shlex.quote(arg)}"
    if pytest_args != DEFAULT_PYTEST_ARGS:
        command += " -- " + shlex.join(pytest_args)
    cache = KernelCache(AptSource(), args.cache)
    results: list[KernelResult] = []
    args.out.mkdir(parents=True, exist_ok=True)
    lock = _exclusive(args.out)
    if lock is None:
        print(f"another run is using {args.out}: wait for it, or give --out DIR", file=sys.stderr)
        return 2
    for spec in _expand(args.kernels):
        load_start = os.getloadavg()[0]
        if spec == "host":
            out = args.out / "host"
            r = run_on_host(REPO, out, pytest_args, args.timeout)
        else:
            try:
                kernel = cache.get(spec)
            except KernelCacheError as e:
                print(f"{spec}: cannot prepare the kernel: {e}", file=sys.stderr)
                r = KernelResult(spec, "qemu-tcg", None, 0.0, error=str(e))
                results.append(r)
                _print_result(r)
                continue
            # No "=" in the name: vng reads "--rwdir a=b" as guest path a, host path b.
            out = args.out / "_".join(
                [kernel.release, *(a.replace("=", "-") for a in args.kernel_arg)]
            )
            print(f"{kernel.release}: booting under qemu TCG (results in {out}) ...", flush=True)
            r = run_in_guest(
                kernel,
                REPO,
                out,
                pytest_args,
                cpus=args.cpus,
                memory=args.memory,
                timeout=args.timeout,
                nice=args.nice,
                kernel_args=tuple(args.kernel_arg),
            )
        r.host_load = (load_start, os.getloadavg()[0])
        r.command = command
        (out / "summary.json").write_text(json.dumps(r.to_json(), indent=2) + "\n")
        results.append(r)
        _print_result(r)
        sys.stdout.flush()
    if args.json:
        args.json.write_text(json.dumps([r.to_json() for r in results], indent=2) + "\n")
    if args.markdown:
        print("\n".join([*TABLE_HEADER, *markdown_rows(results)]))
    bad = [r.kernel for r in results if not r.ok]
    if bad:
        print(f"kernels with failures or no results: {' '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
