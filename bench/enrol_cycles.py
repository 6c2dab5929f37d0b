"""Enrol/remove soak: N pod sandboxes through the real CNI chain and the real agent, with
the agent's fd count, RSS and threads sampled at quiescent points (issue 14, "faults
survived": 10,000 cycles, fd and RSS flat).

    python -m bench.enrol_cycles [--cycles 10000] [--lanes 4] [--sample-every 250]
                                 [--json FILE] [--chart FILE.png]

One cycle is one pod's life as a container runtime and the API server show it to the node:
the pod appears in the API (ambient namespace); its sandbox namespace is made; the runtime
runs the conflist's ADD (``bridge`` + ``host-local``, then the shipped plugin
``build/istio-cni``, which asks the agent over ``pluginevent.sock``: rules in the pod's
namespace, ZDS Add acked by the ztunnel stand-in, annotation); the cycle checks the pod is
enrolled; then the runtime's DEL (reverse order), the pod is deleted from the API, its
namespace removed, and the agent takes it out (probe set, cache, ZDS Del). ``--lanes`` pods
go through at once. Every ``--sample-every`` cycles the lanes stop, the agent is waited on
until it holds no pod and no work, and this process's fd count (``/proc/self/fd``), RSS
(``VmRSS``) and thread count are read: the agent runs in this process (only the Kubernetes
API is the in-memory fake of the agent tests), and the harness itself keeps nothing per cycle
(the fake's watch history is compacted at each sample, as the API server's is). Slopes are
least squares over the samples after the first (warm-up), per 1,000 cycles. Every namespace
made here is removed at the end. Prints one JSON document; exit 1 when a cycle failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
import uuid
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Sample:
    cycles: int
    fds: int
    rss_kib: int
    threads: int
    seconds: float  # since the first cycle


@dataclass
class SoakResult:
    cycles: int = 0
    lanes: int = 0
    failures: list[str] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    fd_slope_per_1000: float = 0.0
    rss_kib_slope_per_1000: float = 0.0
    thread_slope_per_1000: float = 0.0
    cycles_per_second: float = 0.0
    load: tuple[float, float] = (0.0, 0.0)
    command: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def slope_per_1000(xs: list[int], ys: list[int]) -> float:
    """Least-squares slope of ``ys`` over ``xs`` (cycles), per 1,000 cycles; 0 for < 2 points."""
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return 0.0
    return 1000.0 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var


def process_figures() -> tuple[int, int, int]:
    """(open fds, RSS in KiB, threads) of this process, from /proc."""
    fds = len(os.listdir("/proc/self/fd")) - 1  # the listing's own fd
    rss = threads = 0
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    return fds, rss, threads


class SoakNode:
    """A throwaway node (tests/throwaway_node.py): its namespace, the real agent with the
    iptables backend, the ztunnel stand-in, and a bridge + istio-cni chain."""

    def __init__(self, tmp: Path, stack: ExitStack, plugin: str, workers: int) -> None:
        from cni_plugin import constants as c
        from cni_plugin.redirection.registry import make_backend
        from node_agent import logs
        from node_agent.agent_assembly import Agent
        from node_agent.host_probe import HostProbe
        from tests.agent_fakes import FakeKube, wait_for
        from tests.netns.test_standin_zds import StandinProcess
        from tests.throwaway_node import agent_config, own_namespaces

        make = stack.enter_context(own_namespaces("icnis"))
        self.node_netns = "/run/netns/" + make("node")
        self.cfg = agent_config(tmp, self.node_netns, workers=workers)
        os.makedirs(self.cfg.run_dir)
        os.makedirs(self.cfg.proc_root)
        os.makedirs(os.path.dirname(self.cfg.ztunnel_socket))
        self.kube = FakeKube()
        self.kube.put_namespace("demo", {c.DATAPLANE_MODE_LABEL: c.DATAPLANE_MODE_AMBIENT})
        bin_dir = tmp / "bin"
        bin_dir.mkdir()
        os.symlink(os.path.realpath(plugin), bin_dir / "istio-cni")
        self.conflist: dict[str, Any] = {
            "cniVersion": "1.0.0",
            "name": "k8s-pod-network",
            "plugins": [
                {"type": "bridge", "bridge": f"ics{secrets.token_hex(3)}", "isGateway": True,
                 "ipMasq": False, "ipam": {"type": "host-local", "subnet": "10.79.0.0/16",
                 "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(tmp / "ipam")}},
                {"type": "istio-cni", "name": "istio-cni", "cni_agent_run_dir": self.cfg.run_dir,
                 "ambient_enabled": True, "exclude_namespaces": ["kube-system"],
                 "pod_namespace": "istio-cni"},
            ],
        }  # fmt: skip
        self.cni_path = [str(bin_dir), "/usr/lib/cni"]
        self.probe = HostProbe(ipv6=True, node_netns=self.node_netns)
        self.agent = Agent(self.cfg, kube=self.kube, rules=make_backend("iptables"))
        self.standin = StandinProcess(self.cfg.ztunnel_socket, tmp)
        self.standin.start()
        stack.callback(self.standin.stop)
        stack.callback(self.probe.teardown)
        # The agent's own log, as run_command configures it (JSON lines), into a file.
        log_file = stack.enter_context(open(tmp / "agent.log", "a", encoding="utf-8"))  # noqa: SIM115
        logs.configure("info", stream=log_file)
        stack.callback(logging.getLogger().handlers.clear)  # before the file closes
        self.agent.start(sync_timeout=30)
        stack.callback(self.agent.stop)
        zds = self.agent.zds
        assert zds is not None
        wait_for(lambda: zds.connected, timeout=30, what="ztunnel stand-in connected")

    def cycle(self, n: int) -> str | None:
        """One pod's life; None when it went as it should, else what went wrong."""
        import subprocess

        from cni_plugin import constants as c
        from tests.agent_fakes import make_pod, wait_for
        from tests.cni_chain import Chain, ChainError, k8s_env

        uid, name = str(uuid.uuid4()), f"soak-{n}"
        self.kube.put_pod(make_pod("demo", name, uid=uid, ip=None))
        # Made and removed here rather than by own_namespaces, which would keep 10,000
        # names to sweep at the end; the prefix is still the node's, for a sweep after a crash.
        ns = f"icnis-pod-{secrets.token_hex(4)}"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        env = k8s_env(f"/run/netns/{ns}", "demo", name, uid, uid.replace("-", ""))
        chain = Chain(self.conflist, self.cni_path, self.node_netns)
        problem: str | None = None
        try:
            # The kubelet creates a sandbox for a pod the node's watchers have seen.
            wait_for(lambda: self.agent.controller.pod_status("demo", name)["known"],
                     what=f"{name} in the agent's cache")  # fmt: skip
            chain.add(env)
            entry = self.agent.cache.get(uid)
            if entry is None or self.kube.annotation(uid) != c.REDIRECTION_ENABLED:
                problem = f"{name}: ADD returned but the pod is not enrolled"
            chain.delete(env)
        except (ChainError, AssertionError, subprocess.TimeoutExpired) as e:
            problem = f"{name}: {e}"[:400]
        finally:
            self.kube.delete_pod(uid)
            # The runtime removes the sandbox after its DEL; the agent hears of the pod's
            # deletion on its own time and must not need the namespace for it.
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        return problem

    def quiescent(self) -> None:
        """Wait until the agent holds no pod, then compact the fake API's watch history."""
        from tests.agent_fakes import wait_for

        wait_for(lambda: len(self.agent.cache) == 0, timeout=120, what="every pod removed")
        self.kube.compact()


def run(cycles: int, lanes: int, sample_every: int, plugin: str, workers: int) -> SoakResult:
    result = SoakResult(cycles=cycles, lanes=lanes, load=(os.getloadavg()[0], 0.0))
    tmp = Path(tempfile.mkdtemp(prefix="icnit-soak-"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        node = SoakNode(tmp, stack, plugin, workers)
        node.quiescent()
        t0 = time.monotonic()
        fds, rss, threads = process_figures()
        result.samples.append(Sample(0, fds, rss, threads, 0.0))
        done = 0
        lock = threading.Lock()
        while done < cycles:
            batch = list(range(done, min(cycles, done + sample_every)))

            def lane(mine: list[int]) -> None:
                for n in mine:
                    problem = node.cycle(n)
                    if problem is not None:
                        with lock:
                            result.failures.append(problem)

            lane_threads = [
                threading.Thread(target=lane, args=(batch[i::lanes],)) for i in range(lanes)
            ]
            for t in lane_threads:
                t.start()
            for t in lane_threads:
                t.join()
            done += len(batch)
            node.quiescent()
            fds, rss, threads = process_figures()
            result.samples.append(Sample(done, fds, rss, threads, time.monotonic() - t0))
            print(f"{done} cycles: {fds} fds, {rss} KiB, {threads} threads, "
                  f"{len(result.failures)} failed", file=sys.stderr, flush=True)  # fmt: skip
        result.cycles_per_second = done / max(time.monotonic() - t0, 1e-9)
    steady = result.samples[1:]  # the first batch warms caches, pools and imports
    xs = [s.cycles for s in steady]
    result.fd_slope_per_1000 = slope_per_1000(xs, [s.fds for s in steady])
    result.rss_kib_slope_per_1000 = slope_per_1000(xs, [s.rss_kib for s in steady])
    result.thread_slope_per_1000 = slope_per_1000(xs, [s.threads for s in steady])
    result.load = (result.load[0], os.getloadavg()[0])
    return result


def chart(result: SoakResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    xs = [s.cycles for s in result.samples]
    a.plot(xs, [s.fds for s in result.samples], marker=".")
    a.set_ylabel("open fds")
    b.plot(xs, [s.rss_kib / 1024 for s in result.samples], marker=".", color="tab:red")
    b.set_ylabel("RSS (MiB)")
    b.set_xlabel("enrol/remove cycles")
    a.set_title(
        f"Agent over {result.cycles} enrol/remove cycles: fds {result.fd_slope_per_1000:+.2f}, "
        f"RSS {result.rss_kib_slope_per_1000:+.0f} KiB per 1,000",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cycles", type=int, default=10_000)
    p.add_argument("--lanes", type=int, default=4, help="pods going through at once")
    p.add_argument("--sample-every", type=int, default=250, help="cycles between samples")
    p.add_argument("--workers", type=int, default=4, help="the agent's WORKERS")
    p.add_argument("--plugin", default=str(ROOT / "build" / "istio-cni"))
    p.add_argument("--json", type=Path, help="also write the result here")
    p.add_argument("--chart", type=Path, help="write a PNG of fds and RSS over the cycles")
    p.add_argument("--chart-from", type=Path, metavar="JSON", help="run nothing: chart this result")
    args = p.parse_args(argv)
    if args.chart_from is not None:
        if args.chart is None:
            p.error("--chart-from needs --chart FILE.png")
        doc = json.loads(args.chart_from.read_text())
        doc["samples"] = [Sample(**s) for s in doc["samples"]]
        doc["load"] = tuple(doc["load"])
        chart(SoakResult(**doc), args.chart)
        return 0
    if os.geteuid() != 0:
        print("enrol_cycles: run as root (it makes network namespaces)", file=sys.stderr)
        return 2
    if not os.access(args.plugin, os.X_OK):
        print(f"enrol_cycles: no plugin at {args.plugin}: run `make plugin`", file=sys.stderr)
        return 2
    if args.cycles < 1 or args.lanes < 1 or args.sample_every < args.lanes:
        p.error("--cycles and --lanes must be positive and --sample-every at least --lanes")
    result = run(args.cycles, args.lanes, args.sample_every, args.plugin, args.workers)
    result.command = "python -m bench.enrol_cycles " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    doc = json.dumps(result.to_json(), indent=2)
    print(doc)
    if args.json:
        args.json.write_text(doc + "\n")
    if args.chart:
        chart(result, args.chart)
    return 1 if result.failures else 0


if __name__ == "__main__":
    sys.exit(main())
