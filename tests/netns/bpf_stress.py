"""Stress worker for the eBPF backend's thread safety, run as its own process (a libbcc heap
corruption kills the process with SIGSEGV/SIGABRT; the test sees the exit status instead of
losing pytest).

``python -m tests.netns.bpf_stress PIN_ROOT CACHE_DIR ROUNDS NETNS_PATH...``: one thread per
namespace, all released together (a barrier) on a cold image cache, so the first applies
race into the bcc compile and the variant loading; then ROUNDS rounds of apply / check /
remove / apply with alternating settings variants (DNS capture on/off), every thread at
once. Prints one JSON line: errors, failed checks, applies and their median time.
"""

from __future__ import annotations

import json
import statistics
import sys
import threading
import time

from cni_plugin.bpf.backend import EbpfBackend
from cni_plugin.redirection.settings import RedirectSettings


def main(argv: list[str]) -> int:
    pin_root, cache_dir, rounds, paths = argv[0], argv[1], int(argv[2]), argv[3:]
    backend = EbpfBackend(pin_root=pin_root, cache_dir=cache_dir)
    barrier = threading.Barrier(len(paths))
    errors: list[str] = []
    bad_checks: list[str] = []
    times: list[float] = []
    lock = threading.Lock()

    def work(path: str) -> None:
        try:
            barrier.wait()
            for r in range(rounds):
                s = RedirectSettings(dns_capture=bool(r % 2))
                t0 = time.perf_counter()
                backend.apply(path, s)
                dt = time.perf_counter() - t0
                rep = backend.check(path, s)
                with lock:
                    times.append(dt)
                    if not rep.ok:
                        bad_checks.append(f"{path} round {r}: {rep.missing} {rep.extra}")
                barrier.wait()  # every thread at the same point: maximal overlap
                backend.remove(path, s)
                if backend.check(path, s).ok:
                    with lock:
                        bad_checks.append(f"{path} round {r}: still ok after remove")
                backend.apply(path, s)
        except BaseException as e:  # reported, never swallowed: the test fails on it
            with lock:
                errors.append(f"{path}: {type(e).__name__}: {e}")
            barrier.abort()

    threads = [threading.Thread(target=work, args=(p,)) for p in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for p in paths:  # leave the namespaces as found
        backend.remove(p, RedirectSettings(dns_capture=bool((rounds - 1) % 2)))
    out = {
        "errors": errors,
        "bad_checks": bad_checks,
        "applies": len(times),
        "apply_ms_median": round(statistics.median(times) * 1000, 2) if times else None,
        "apply_ms_max": round(max(times) * 1000, 2) if times else None,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
