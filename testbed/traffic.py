"""Continuous traffic from inside one pod, counting every failure: ``python -m testbed.traffic``.

Role: the client side of the enrol-under-traffic test (issue 19). Started inside a pod's
network namespace (``nsenter --net=/proc/<pid>/ns/net -- python -m testbed.traffic ...``, so
every socket it makes is the pod's and goes through the pod's redirection), it keeps, per
target server ``IP``:

- a *new-connection* worker: connect to ``IP:--http-port``, ``GET /`` (HTTP/1.0), read to
  EOF, expect ``200`` and a body naming the server, pause ``--interval``, again;
- two *long-lived* connections to ``IP:--echo-port`` (a line echo server), each sending a
  numbered line every ``--ping`` seconds and expecting it back: ``pinned`` is opened once at
  start, ``fresh`` is re-opened (closed cleanly first) on every ``rotate`` command, so the next
  change is crossed by a connection made in the current state.

Commands on stdin, one per line: ``phase NAME`` (later attempts count for NAME), ``rotate``,
``progress`` (prints one JSON line: the current phase's ``{"new": sent, "long": sent}``),
``stop``. On ``stop`` (or EOF, or ``--max-seconds``) it prints one JSON object and exits 0:
``{"phases": {NAME: {"new": {...}, "long": {...}}}, "failures": [...], "slow": [...]}``
where each count block has ``sent``/``failed``/``errors`` and each failure its wall-clock
``time``, ``phase``, ``kind`` (``connect``, ``request``, ``long-connect``, ``long``),
``target``, local ``port`` and ``error``. A long-lived failure is reconnected and counted
once. Requests slower than ``--slow`` seconds are listed (a dropped SYN shows as ~1 s).

Invariant: bounded: every socket has a timeout and the run ends by ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

CONNECT_TIMEOUT = 3.0
IO_TIMEOUT = 5.0


@dataclass
class Tally:
    sent: int = 0
    failed: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {"sent": self.sent, "failed": self.failed, "errors": dict(self.errors)}


class Recorder:
    """Counts per phase and the failure list; shared by every worker thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.phase = "start"
        self.tallies: dict[str, dict[str, Tally]] = {}
        self.failures: list[dict[str, Any]] = []
        self.slow: list[dict[str, Any]] = []

    def _tally(self, phase: str, kind: str) -> Tally:
        return self.tallies.setdefault(phase, {"new": Tally(), "long": Tally()})[kind]

    def set_phase(self, name: str) -> None:
        with self._lock:
            self.phase = name
            self._tally(name, "new")

    def current(self) -> str:
        with self._lock:
            return self.phase

    def progress(self) -> dict[str, int]:
        """Attempts so far in the current phase, per kind."""
        with self._lock:
            return {k: self._tally(self.phase, k).sent for k in ("new", "long")}

    def ok(self, phase: str, kind: str) -> None:
        with self._lock:
            self._tally(phase, kind).sent += 1

    def failed(self, phase: str, kind: str, what: str, target: str, port: int, error: str,
               **extra: Any) -> None:  # fmt: skip
        with self._lock:
            t = self._tally(phase, "new" if what in ("connect", "request") else "long")
            t.sent += 1
            t.failed += 1
            t.errors[f"{what}: {error.split(' [', 1)[0]}"] += 1
            self.failures.append(
                {"time": round(time.time(), 4), "phase": phase, "kind": what, "target": target,
                 "port": port, "error": error, **extra}
            )  # fmt: skip

    def slow_request(self, phase: str, target: str, seconds: float) -> None:
        with self._lock:
            self.slow.append({"time": round(time.time(), 4), "phase": phase, "target": target,
                              "seconds": round(seconds, 3)})  # fmt: skip

    def report(self) -> dict[str, Any]:
        with self._lock:
            phases = {p: {k: t.as_dict() for k, t in kinds.items()}
                      for p, kinds in self.tallies.items()}  # fmt: skip
            return {"phases": phases, "failures": list(self.failures), "slow": list(self.slow)}


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def _local_port(s: socket.socket) -> int:
    try:
        return int(s.getsockname()[1])
    except OSError:
        return 0


class Generator:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rec = Recorder()
        self.stop = threading.Event()
        self.rotation = 0
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for target in self.args.targets:
            self._spawn(self._new_connections, target)
            self._spawn(self._long_lived, target, False)
            self._spawn(self._long_lived, target, True)

    def _spawn(self, fn: Any, *args: Any) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        t.start()
        self._threads.append(t)

    def join(self) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(IO_TIMEOUT + CONNECT_TIMEOUT + 1)

    # --- new connections ---------------------------------------------------------------------
    def _new_connections(self, target: str) -> None:
        while not self.stop.is_set():
            self._one_request(target)
            self.stop.wait(self.args.interval)

    def _one_request(self, target: str) -> None:
        ip, _, name = target.partition("=")
        phase = self.rec.current()
        started = time.monotonic()
        began = round(time.time(), 4)
        s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM)
        with s:
            s.settimeout(CONNECT_TIMEOUT)
            try:
                s.connect((ip, self.args.http_port))
            except OSError as e:
                self.rec.failed(phase, "new", "connect", ip, _local_port(s), _err(e), began=began)
                return
            port = _local_port(s)
            s.settimeout(IO_TIMEOUT)
            try:
                s.sendall(f"GET / HTTP/1.0\r\nHost: {ip}\r\n\r\n".encode())
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            except OSError as e:
                self.rec.failed(phase, "new", "request", ip, port, _err(e), began=began)
                return
        head, _, body = data.partition(b"\r\n\r\n")
        if b" 200 " not in head.split(b"\r\n", 1)[0] + b" " or (name and name.encode() not in body):
            self.rec.failed(phase, "new", "request", ip, port,
                            f"bad answer: {data[:80]!r}", began=began)  # fmt: skip
            return
        self.rec.ok(phase, "new")
        took = time.monotonic() - started
        if took > self.args.slow:
            self.rec.slow_request(phase, ip, took)

    # --- long-lived connections --------------------------------------------------------------
    def _long_lived(self, target: str, fresh: bool) -> None:
        ip = target.partition("=")[0]
        label = f"{ip} ({'fresh' if fresh else 'pinned'})"
        while not self.stop.is_set():
            phase = self.rec.current()
            opened = time.monotonic()
            s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
            s.settimeout(CONNECT_TIMEOUT)
            try:
                s.connect((ip, self.args.echo_port))
            except OSError as e:
                s.close()
                self.rec.failed(phase, "long", "long-connect", label, 0, _err(e))
                self.stop.wait(self.args.ping)
                continue
            s.settimeout(IO_TIMEOUT)
            with s:
                self._ping_until_done(s, label, fresh, opened)

    def _ping_until_done(self, s: socket.socket, label: str, fresh: bool, opened: float) -> None:
        """Ping on ``s`` until stop, a rotation (fresh only; closed cleanly) or a failure."""
        rotation = self.rotation
        port = _local_port(s)
        reader = s.makefile("rb")
        seq = 0
        while not self.stop.is_set():
            if fresh and self.rotation != rotation:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_WR)
                return
            phase = self.rec.current()
            seq += 1
            line = f"{port} {seq}\n".encode()
            try:
                s.sendall(line)
                back = reader.readline()
            except OSError as e:
                back, error = b"", _err(e)
            else:
                error = "connection closed by peer" if not back else f"echo {back[:40]!r}"
            if back == line:
                self.rec.ok(phase, "long")
                self.stop.wait(self.args.ping)
                continue
            age = round(time.monotonic() - opened, 2)
            self.rec.failed(phase, "long", "long", label, port, error, age_s=age, seq=seq)
            return

    def rotate(self) -> None:
        self.rotation += 1


def _commands(gen: Generator, done: threading.Event) -> None:
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "phase" and arg:
            gen.rec.set_phase(arg)
        elif cmd == "rotate":
            gen.rotate()
        elif cmd == "progress":
            sys.stdout.write(json.dumps(gen.rec.progress()) + "\n")
            sys.stdout.flush()
        elif cmd == "stop":
            break
    done.set()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m testbed.traffic", description=__doc__.split("\n")[0]
    )
    p.add_argument("targets", nargs="+", help="server IP, or IP=NAME to expect NAME in the body")
    p.add_argument("--http-port", type=int, default=8080)
    p.add_argument("--echo-port", type=int, default=9000)
    p.add_argument("--interval", type=float, default=0.02, help="pause between new requests (s)")
    p.add_argument("--ping", type=float, default=0.1, help="pause between long-lived pings (s)")
    p.add_argument("--slow", type=float, default=0.5, help="list requests slower than this (s)")
    p.add_argument("--max-seconds", type=float, default=600.0, help="stop after this long")
    p.add_argument("--phase", default="start", help="name of the first phase")
    args = p.parse_args(argv)
    gen = Generator(args)
    gen.rec.set_phase(args.phase)
    gen.start()
    done = threading.Event()
    threading.Thread(target=_commands, args=(gen, done), daemon=True).start()
    done.wait(args.max_seconds)
    gen.join()
    json.dump(gen.rec.report(), sys.stdout)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
