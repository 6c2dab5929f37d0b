"""eBPF vs iptables redirection, side by side in one run: per-pod install time and data path.

Install: each sample gets a fresh pod namespace per method (lo up, a veth ``eth0`` up),
created and deleted outside the timed region, methods interleaved. Timed: the backend's
whole ``apply`` (entering the namespace included), plus the bare ``iptables-legacy-restore``
of Istio's golden rules (IPv4+IPv6) as the reference the issue names.

Data path: a pod and a peer namespace joined by a veth; the peer serves an echo on :80.
Modes: ``direct`` (no redirection: the app talks to the peer), and each backend applied, the
app's connection captured to a ztunnel stand-in on 15001 that learns the original
destination as ztunnel does (SO_ORIGINAL_DST, else the local address) and relays to it
with SO_MARK 1337. Measured per mode: connections per second (connect, 64-byte request,
reply, close, for ``--seconds``) and request latency on one connection (median and p99 of
``--requests`` round trips), modes interleaved over ``--rounds`` rounds, medians
reported. Ratios are to ``direct``.

Run as root: ``.venv/bin/python -m bench.ebpf_redirect [--samples 100] [--seconds 2]``.
Namespaces are named ``icnbench-*``; bpffs pins go under a per-run root; all removed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import select
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from cni_plugin.netns import run_in_netns
from cni_plugin.redirection.backend import RedirectionBackend
from cni_plugin.redirection.registry import make_backend
from cni_plugin.redirection.settings import RedirectSettings

PREFIX = "icnbench-"
REFERENCE = Path(__file__).resolve().parents[1] / ".." / "shared" / "reference"
POD, PEER = "198.51.100.2", "198.51.100.1"
SO_ORIGINAL_DST = 80
MARK = 0x539
PIN_ROOT = f"/sys/fs/bpf/icnbench-{os.getpid()}"
CACHE_DIR = "/tmp/icnbench-bpf-cache"


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def _netns(tag: str) -> str:
    name = f"{PREFIX}{tag}-{secrets.token_hex(3)}"
    _sh("ip", "netns", "add", name)
    _sh("ip", "-n", name, "link", "set", "lo", "up")
    return name


def _delete(*names: str) -> None:
    for n in names:
        subprocess.run(["ip", "netns", "del", n], capture_output=True)


def _pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


# -- install time ------------------------------------------------------------------------
def _restore_text() -> list[tuple[str, str]]:
    text = (REFERENCE / "istio-1.24" / "iptables" / "default_ipv6.golden").read_text()
    blocks, cur = [], []
    for line in text.splitlines():
        cur.append(line)
        if line == "COMMIT":
            blocks.append("\n".join(cur) + "\n")
            cur = []
    return [("iptables", "".join(blocks[:3])), ("ip6tables", "".join(blocks[3:]))]


def _restore(path: str) -> None:
    halves = _restore_text()

    def work() -> None:
        for cmd, text in halves:
            subprocess.run([f"{cmd}-legacy-restore", "--noflush"], input=text.encode(),
                           check=True, capture_output=True)  # fmt: skip

    run_in_netns(path, work)


def install_times(samples: int) -> dict[str, list[float]]:
    settings = RedirectSettings()
    iptables = make_backend("iptables", applier="iptables-restore")
    ebpf = make_backend("ebpf", pin_root=PIN_ROOT, cache_dir=CACHE_DIR)
    methods: dict[str, Callable[[str], None]] = {
        "iptables-legacy-restore (rules only)": _restore,
        "IptablesBackend.apply": lambda p: iptables.apply(p, settings),
        "EbpfBackend.apply": lambda p: ebpf.apply(p, settings),
    }
    # Warm up: compile/load the eBPF image and variant once (per agent start, not per pod).
    warm = _netns("warm")
    try:
        _sh("ip", "-n", warm, "link", "add", "eth0", "type", "veth", "peer", "name", "e1")
        ebpf.apply(f"/run/netns/{warm}", settings)
        ebpf.remove(f"/run/netns/{warm}", settings)
    finally:
        _delete(warm)
    out: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(samples):
        for name, method in methods.items():
            ns = _netns("pod")
            try:
                _sh("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "e1")
                _sh("ip", "-n", ns, "link", "set", "eth0", "up")
                path = f"/run/netns/{ns}"
                t = time.perf_counter()
                method(path)
                out[name].append(time.perf_counter() - t)
                if name == "EbpfBackend.apply":
                    ebpf.remove(path, settings)  # its pod pins live outside the namespace
            finally:
                _delete(ns)
    return out


# -- data path ---------------------------------------------------------------------------
def _echo_server(path: str, stop: threading.Event) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", 80))
        s.listen(512)
        return s

    srv = run_in_netns(path, make, host_netns=None)

    def serve(conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data)

    def loop() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    return srv


def _original_dst(conn: socket.socket) -> tuple[str, int]:
    try:
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        return socket.inet_ntoa(raw[4:8]), int.from_bytes(raw[2:4], "big")
    except OSError:
        local = conn.getsockname()
        return str(local[0]), int(local[1])


def _standin(path: str, stop: threading.Event) -> socket.socket:
    """ztunnel's outbound listener, reduced to what costs time: accept, learn the original
    destination, connect to it marked 1337, relay."""

    def make() -> socket.socket:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MARK)
        s.bind(("0.0.0.0", 15001))
        s.listen(512)
        return s

    lst = run_in_netns(path, make)

    def relay(conn: socket.socket) -> None:
        dst = _original_dst(conn)
        up = run_in_netns(path, _marked_socket)
        with conn, up:
            # No Nagle on either leg: small request/reply pairs would stall on delayed ACKs.
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            up.connect(dst)
            socks = [conn, up]
            while True:
                r, _, _ = select.select(socks, [], [], 5)
                if not r:
                    return
                for s in r:
                    data = s.recv(4096)
                    if not data:
                        return
                    (up if s is conn else conn).sendall(data)

    def loop() -> None:
        lst.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = lst.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=relay, args=(conn,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    return lst


def _marked_socket() -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MARK)
    return s


@contextlib.contextmanager
def _topology() -> Iterator[tuple[str, str]]:
    pod, peer = _netns("pod"), _netns("peer")
    try:
        _sh("ip", "link", "add", "eth0", "netns", pod, "type", "veth", "peer", "name", "eth0",
            "netns", peer)  # fmt: skip
        for ns, addr in ((pod, POD), (peer, PEER)):
            _sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _sh("ip", "-n", ns, "link", "set", "eth0", "up")
        yield pod, peer
    finally:
        _delete(pod, peer)


def datapath(mode: str, seconds: float, requests: int) -> dict[str, float]:
    settings = RedirectSettings()
    stop = threading.Event()
    with _topology() as (pod, peer):
        pod_path = f"/run/netns/{pod}"
        backend: RedirectionBackend | None = None
        socks = [_echo_server(f"/run/netns/{peer}", stop), _standin(pod_path, stop)]
        try:
            if mode == "iptables":
                backend = make_backend("iptables", applier="iptables-restore")
            elif mode == "ebpf":
                backend = make_backend("ebpf", pin_root=PIN_ROOT, cache_dir=CACHE_DIR)
            if backend is not None:
                backend.apply(pod_path, settings)
            payload = b"x" * 64
            conns = 0
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                c = run_in_netns(pod_path, socket.socket)
                with c:
                    c.connect((PEER, 80))
                    c.sendall(payload)
                    got = b""
                    while len(got) < len(payload):
                        got += c.recv(4096)
                conns += 1
            lat: list[float] = []
            c = run_in_netns(pod_path, socket.socket)
            with c:
                c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                c.connect((PEER, 80))
                for _ in range(requests):
                    t = time.perf_counter()
                    c.sendall(payload)
                    got = b""
                    while len(got) < len(payload):
                        got += c.recv(4096)
                    lat.append(time.perf_counter() - t)
            if backend is not None:
                backend.remove(pod_path, settings)
        finally:
            stop.set()
            for s in socks:
                s.close()
    return {
        "conn_per_s": conns / seconds,
        "lat_median_us": statistics.median(lat) * 1e6,
        "lat_p99_us": _pct(lat, 99) * 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3, help="data path rounds (median taken)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("run as root (namespaces, bpf)", file=sys.stderr)
        return 2
    try:
        times = install_times(args.samples)
        ref = statistics.median(times["iptables-legacy-restore (rules only)"])
        print(f"\n## install, IPv4+IPv6, {args.samples} fresh namespaces each\n")
        print("| method | median ms | p90 ms | vs iptables-restore |\n|---|---:|---:|---:|")
        for name, xs in times.items():
            med = statistics.median(xs)
            print(f"| {name} | {med * 1e3:.2f} | {_pct(xs, 90) * 1e3:.2f} | {med / ref:.2f}x |")
        modes = ("direct", "iptables", "ebpf")
        rounds = [{m: datapath(m, args.seconds, args.requests) for m in modes}
                  for _ in range(args.rounds)]  # fmt: skip
        results = {m: {k: statistics.median(r[m][k] for r in rounds) for k in rounds[0][m]}
                   for m in modes}  # fmt: skip
        d = results["direct"]
        print(f"\n## data path, IPv4, median of {args.rounds} interleaved rounds: "
              f"{args.seconds:g} s of connections, {args.requests} requests on one "
              "connection\n")  # fmt: skip
        print("| mode | conn/s | vs direct | latency median us | vs direct | p99 us | vs direct |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for m, r in results.items():
            cells = [f"{r[k]:.0f} | {r[k] / d[k]:.2f}x" for k in ("conn_per_s", "lat_median_us",
                                                               "lat_p99_us")]  # fmt: skip
            print(f"| {m} | " + " | ".join(cells) + " |")
    finally:
        shutil.rmtree(PIN_ROOT, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
