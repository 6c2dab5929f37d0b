"""ZDS and stand-in data path benchmarks (docs/benchmarks.md, "ZDS and the ztunnel stand-in").

1. ZDS Add round trips: the agent's ``ZdsServer.add`` (open the pod netns, send Add + fd,
   wait for the ack) for N fresh pod namespaces, against (a) a raw peer that acks at once,
   which isolates the agent's side, and (b) the ztunnel stand-in, which opens five listeners
   in the pod and issues its certificate before acking. Then Del for each, and the time a
   restarted stand-in needs to get every pod back from the snapshot.
2. Proxy overhead: M sequential HTTP requests, one new connection each, from pod A to an app
   in pod B: first directly (no rules, nothing enrolled), then, in the same run, with the
   iptables backend applied in both pods and both enrolled, i.e. through 15001 in A, HBONE
   (TLS 1.3 + CONNECT) to 15008 in B and B's stand-in to the app.

Run as root: ``python -m bench.zds_bench --pods 50 --requests 300``. Namespaces are named
``icnib-*`` and removed on exit, also on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from cni_plugin.redirection.registry import make_backend
from cni_plugin.redirection.settings import RedirectSettings
from node_agent import zds_socket
from node_agent import zds_wire as w
from node_agent.zds_server import SnapshotEntry, WorkloadInfo, ZdsServer
from testbed.ztunnel_standin.topology import AppServer, TwoPods, client_socket, http_get

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "icnib-"


class Snapshot:
    def __init__(self) -> None:
        self.entries: list[SnapshotEntry] = []

    def snapshot(self) -> list[SnapshotEntry]:
        return list(self.entries)


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def wait_for(pred: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.005)
    return pred()


@contextmanager
def namespaces(n: int) -> Iterator[list[str]]:
    names: list[str] = []
    try:
        for _ in range(n):
            name = f"{PREFIX}{secrets.token_hex(4)}"
            subprocess.run(["ip", "netns", "add", name], check=True)
            names.append(name)
        yield [f"/run/netns/{x}" for x in names]
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


@contextmanager
def standin(sock: str, workdir: str, *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    with open(os.path.join(workdir, "standin.log"), "ab") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "testbed.ztunnel_standin",
                "--socket",
                sock,
                "--access-log",
                os.path.join(workdir, "access.log"),
                "--ca-dir",
                os.path.join(workdir, "ca"),
                "--log-level",
                "warning",
                *extra,
            ],
            cwd=ROOT,
            stderr=err,
        )
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def acking_peer(path: str, stop: threading.Event) -> threading.Thread:
    """A ztunnel that acks everything immediately (closes received fds)."""

    def run() -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(path)
        zds_socket.send_packet(s, w.encode_hello(), timeout=5)
        ack = w.encode_ack()
        try:
            while not stop.is_set():
                try:
                    pkt = zds_socket.recv_packet(s, timeout=0.2)
                except w.ZdsClosedError as e:
                    if isinstance(e.__cause__, TimeoutError):
                        continue
                    return
                pkt.close_fds()
                zds_socket.send_packet(s, ack, timeout=5)
        finally:
            s.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def bench_adds(n: int, tmp: str) -> dict[str, object]:
    results: dict[str, object] = {"pods": n}
    info = WorkloadInfo("bench", "bench", "bench-sa")
    with namespaces(n) as paths:
        # (a) raw acking peer: the agent's side alone.
        src = Snapshot()
        server = ZdsServer(os.path.join(tmp, "raw", "z.sock"), src, accept_rate=1000)
        server.start()
        stop = threading.Event()
        peer = acking_peer(server.socket_path, stop)
        try:
            assert wait_for(lambda: server.connected, 5)
            results["raw_add"] = timed(lambda i: server.add(f"u{i}", paths[i], info), n)
            results["raw_del"] = timed(lambda i: server.delete(f"u{i}"), n)
        finally:
            stop.set()
            peer.join()
            server.stop()

        # (b) the stand-in: listeners + certificate per pod before the ack.
        server = ZdsServer(os.path.join(tmp, "si", "z.sock"), src, accept_rate=1000)
        server.start()
        try:
            with standin(server.socket_path, tmp):
                assert wait_for(lambda: server.connected, 10)
                results["standin_add"] = timed(lambda i: server.add(f"u{i}", paths[i], info), n)
                src.entries = [SnapshotEntry(f"u{i}", info, p) for i, p in enumerate(paths)]
            assert wait_for(lambda: not server.connected, 10)
            t0 = time.perf_counter()
            with standin(server.socket_path, tmp):
                # From process start until a Del queued behind the snapshot is acked: the
                # restarted stand-in has every pod's listeners open again.
                assert wait_for(lambda: server.connected, 60)
                server.delete("u0")
                results["standin_restart_replay_s"] = round(time.perf_counter() - t0, 3)
                results["standin_del"] = timed(lambda i: server.delete(f"u{i + 1}"), n - 1)
        finally:
            server.stop()
    return results


def timed(op: Callable[[int], None], n: int) -> dict[str, float]:
    lat = []
    t0 = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        op(i)
        lat.append(time.perf_counter() - t)
    total = time.perf_counter() - t0
    return {
        "per_s": round(n / total, 1),
        "median_ms": round(statistics.median(lat) * 1000, 3),
        "p99_ms": round(pct(lat, 99) * 1000, 3),
    }


def bench_proxy(m: int, tmp: str) -> dict[str, object]:
    pods = TwoPods(prefix=PREFIX, subnet=78)
    app = None
    server = ZdsServer(os.path.join(tmp, "px", "z.sock"), Snapshot(), accept_rate=1000)
    try:
        app = AppServer(pods.b.path, pods.b.ip, 8080, "b")

        def run() -> dict[str, float]:
            lat = []
            t0 = time.perf_counter()
            for i in range(m):
                s = client_socket(pods.a.path)
                t = time.perf_counter()
                reply = http_get(s, pods.b.ip, 8080, f"/{i}")
                lat.append(time.perf_counter() - t)
                assert reply.startswith(b"HTTP/1.1 200"), reply
            total = time.perf_counter() - t0
            return {
                "conn_per_s": round(m / total, 1),
                "median_ms": round(statistics.median(lat) * 1000, 3),
                "p99_ms": round(pct(lat, 99) * 1000, 3),
            }

        run()  # warm up (ARP, page cache)
        direct = run()
        backend = make_backend("iptables", applier="iptables-restore")
        settings = RedirectSettings(dns_capture=True, ipv6=False)
        for p in (pods.a, pods.b):
            backend.apply(p.path, settings)
        server.start()
        with standin(server.socket_path, tmp):
            assert wait_for(lambda: server.connected, 10)
            server.add("ua", pods.a.path, WorkloadInfo("a", "bench", "a-sa"))
            server.add("ub", pods.b.path, WorkloadInfo("b", "bench", "b-sa"))
            run()  # warm up
            mesh = run()
            lines = Path(tmp, "access.log").read_text().splitlines()
            hbone = sum(1 for x in lines if json.loads(x).get("dst.hbone_addr"))
            assert hbone >= 2 * m, "requests did not go through HBONE"
    finally:
        if app is not None:
            app.close()
        server.stop()
        pods.close()
    return {
        "requests": m,
        "direct": direct,
        "mesh": mesh,
        "ratio": {
            "conn_per_s": round(mesh["conn_per_s"] / direct["conn_per_s"], 3),
            "median": round(mesh["median_ms"] / direct["median_ms"], 2),
            "p99": round(mesh["p99_ms"] / direct["p99_ms"], 2),
        },
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pods", type=int, default=50)
    p.add_argument("--requests", type=int, default=300)
    args = p.parse_args()
    if os.geteuid() != 0:
        print("zds_bench: run as root (it creates network namespaces)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="zds-bench-") as tmp:
        out = {"adds": bench_adds(args.pods, tmp), "proxy": bench_proxy(args.requests, tmp)}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
