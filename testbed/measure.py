"""Measure the testbed's own timings (the numbers in docs/testbed.md).

``python -m testbed.measure [--pods N] [--kubernetes VERSION ...] [--rounds R]``: per release
(default: the default one; ``--kubernetes v1.36.3 --kubernetes 1.20`` compares two in the same
run, alternating, R rounds each), warm ``up`` (to node Ready; the split into apiserver
``/readyz`` and kubelet-start-to-node-Ready comes from ``info["timings"]``), N single-pod
create-to-Ready samples (``kubectl apply`` of an httpd pod with an HTTP readiness probe,
until the API says Ready), then ``down``. Uses its own instance (``measure``); prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from testbed.layout import Layout
from testbed.node import Testbed


def _pod(name: str, image: str) -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {
                "terminationGracePeriodSeconds": 2,
                "containers": [
                    {
                        "name": "app",
                        "image": image,
                        "readinessProbe": {
                            "httpGet": {"path": "/", "port": 8080},
                            "periodSeconds": 1,
                        },
                    }
                ],
            },
        }
    )


def _ready(bed: Testbed, name: str) -> bool:
    out = bed.kubectl(
        "get", "pod", name, "-o", "jsonpath={.status.conditions[?(@.type=='Ready')].status}"
    )
    return out.stdout.strip() == "True"


def _round(version: str | None, pods: int) -> dict[str, object]:
    bed = Testbed(Layout.for_instance("measure"), kubernetes_version=version)
    t0 = time.monotonic()
    info = bed.up()
    up_s = time.monotonic() - t0
    samples: list[float] = []
    try:
        for i in range(pods):
            name = f"m{i}"
            t = time.monotonic()
            bed.kubectl("apply", "-f", "-", input=_pod(name, info["images"]["httpd"]))
            while not _ready(bed, name):
                if time.monotonic() - t > 120:
                    raise TimeoutError(f"pod {name} not Ready in 120s")
                time.sleep(0.05)
            samples.append(time.monotonic() - t)
    finally:
        t1 = time.monotonic()
        problems = bed.down()
        down_s = time.monotonic() - t1
    timings = info.get("timings", {})
    return {
        "kubernetes_version": info["kubernetes_version"],
        "warm_up_s": round(up_s, 1),
        "apiserver_ready_s": timings.get("kube-apiserver /readyz"),
        "kubelet_start_to_node_ready_s": timings.get("node Ready"),
        "pod_create_to_ready_s": [round(s, 2) for s in samples],
        "pod_create_to_ready_median_s": round(statistics.median(samples), 2) if samples else None,
        "down_s": round(down_s, 1),
        "down_problems": problems,
        "loadavg": os.getloadavg(),
    }


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m testbed.measure")
    p.add_argument("--pods", type=int, default=5)
    p.add_argument("--kubernetes", action="append", help="release(s) to measure, in turn")
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args()
    versions: list[str | None] = list(args.kubernetes or [None])
    results = [_round(v, args.pods) for _ in range(args.rounds) for v in versions]
    print(json.dumps(results[0] if len(results) == 1 else results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
