"""Ambient pod ADD, end to end: plugin exec -> agent (one ``POST /cmdadd``: judged and
enrolled) -> iptables rules in the pod netns -> ZDS Add acked by the ztunnel stand-in ->
annotation -> 200.

``python -m bench.plugin_ambient [--pods N] [--concurrency 1 20] [--plugin PATH]``, as root.
The agent is the real one (real iptables backend, real ZDS server, the stand-in process as
ztunnel, host probe in a throwaway node namespace); only the Kubernetes API is the
in-memory fake of the agent tests. Latency is from spawning the plugin to its exit, per
pod; with concurrency C, C plugins are spawned at once (C sandboxes created together).
Every namespace made here is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--pods", type=int, default=100, help="pods per concurrency level")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 20])
    p.add_argument("--plugin", default=str(ROOT / "build" / "istio-cni"))
    p.add_argument("--backend", default="iptables")
    p.add_argument("--json", help="write results here")
    args = p.parse_args(argv)

    from cni_plugin import constants as c
    from cni_plugin.redirection.registry import make_backend
    from node_agent.host_probe import HostProbe
    from node_agent.run_command import Agent
    from tests.agent_fakes import FakeKube, make_pod, wait_for
    from tests.netns.test_standin_zds import StandinProcess
    from tests.throwaway_node import agent_config, own_namespaces

    tmp = Path(tempfile.mkdtemp(prefix="icnit-bench-amb-"))
    namespaces = ExitStack()  # closed last but one: after the agent, before tmp goes
    netns = namespaces.enter_context(own_namespaces("icnib"))
    node_netns = "/run/netns/" + netns("node")
    kube = FakeKube()
    kube.put_namespace("demo", {c.DATAPLANE_MODE_LABEL: c.DATAPLANE_MODE_AMBIENT})
    cfg = agent_config(tmp, node_netns, workers=8)
    os.makedirs(cfg.proc_root)
    os.makedirs(os.path.dirname(cfg.ztunnel_socket))
    agent = Agent(cfg, kube=kube, rules=make_backend(args.backend))
    standin = StandinProcess(cfg.ztunnel_socket, tmp)
    probe = HostProbe(ipv6=True, node_netns=node_netns)
    results: dict[str, Any] = {"plugin": args.plugin, "backend": args.backend, "levels": {}}
    try:
        standin.start()
        agent.start(sync_timeout=10)
        zds = agent.zds
        assert zds is not None
        wait_for(lambda: zds.connected, timeout=20, what="ztunnel stand-in connected")
        seq = 0
        for conc in args.concurrency:
            samples: list[float] = []
            failures: list[str] = []
            level_uids: list[str] = []
            for _ in range(max(1, args.pods // conc)):
                batch = []
                for _ in range(conc):
                    seq += 1
                    uid = str(uuid.uuid4())
                    ip = f"10.88.{seq // 250}.{seq % 250 + 2}"
                    kube.put_pod(make_pod("demo", f"p{seq}", uid=uid, ip=None))
                    batch.append((uid, "/run/netns/" + netns("pod"), ip))
                    level_uids.append(uid)
                # Let the agent's informer see the pods first, as it would have before the
                # kubelet creates their sandboxes.
                names = [f"p{s}" for s in range(seq - len(batch) + 1, seq + 1)]
                wait_for(
                    lambda names=names: all(
                        agent.controller.pod_status("demo", n)["known"] for n in names
                    ),
                    what="pods in the agent cache",
                )
                procs = []
                for i, (uid, ns_path, ip) in enumerate(batch):
                    name = f"p{seq - len(batch) + 1 + i}"
                    env = {
                        "PATH": "/nonexistent", "CNI_COMMAND": "ADD", "CNI_CONTAINERID": uid,
                        "CNI_NETNS": ns_path, "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin",
                        "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME={name};"
                        f"K8S_POD_UID={uid}",
                    }  # fmt: skip
                    conf = {
                        "cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "istio-cni",
                        "ambient_enabled": True, "exclude_namespaces": ["kube-system"],
                        "cni_agent_run_dir": cfg.run_dir, "pod_namespace": "istio-cni",
                        "prevResult": {"cniVersion": "1.0.0", "ips": [
                            {"address": f"{ip}/16", "gateway": "10.88.0.1", "interface": 0}]},
                    }  # fmt: skip
                    t0 = time.perf_counter()
                    proc = subprocess.Popen([args.plugin], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            env=env)  # fmt: skip
                    assert proc.stdin is not None
                    proc.stdin.write(json.dumps(conf).encode())
                    proc.stdin.close()
                    procs.append((t0, proc))
                for t0, proc in procs:
                    assert proc.stdout is not None and proc.stderr is not None
                    out = proc.stdout.read()
                    proc.stderr.read()
                    proc.wait(timeout=60)
                    samples.append((time.perf_counter() - t0) * 1000)
                    if proc.returncode != 0:
                        failures.append(out.decode()[:300])
            # The agent's share: from the /cmdadd request to its 200, per step.
            agent_ms: list[float] = []
            steps: dict[str, list[float]] = {}
            for uid in level_uids:
                entry = agent.cache.get(uid)
                if entry is None or entry.latency_s is None:
                    continue
                agent_ms.append(entry.latency_s * 1000)
                for k, v in entry.steps_ms.items():
                    steps.setdefault(k, []).append(v)
            s = sorted(samples)
            results["levels"][str(conc)] = {
                "agent_median_ms": statistics.median(agent_ms) if agent_ms else None,
                "agent_steps_median_ms": {k: statistics.median(v) for k, v in steps.items()},
                "pods": len(s),
                "median_ms": statistics.median(s),
                "p99_ms": s[min(len(s) - 1, int(len(s) * 0.99))],
                "max_ms": s[-1],
                "failures": len(failures),
                "first_failure": failures[0] if failures else None,
            }
    finally:
        agent.stop()
        standin.stop()
        probe.teardown()
        namespaces.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
