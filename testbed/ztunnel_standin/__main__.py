"""``python -m testbed.ztunnel_standin --socket PATH --access-log PATH [...]``: run until
SIGTERM or SIGINT, then close every pod proxy (listeners and connections) and exit 0."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence

from cni_plugin import constants as c
from node_agent.logs import configure
from testbed.ztunnel_standin.runtime import StandIn
from testbed.ztunnel_standin.workloads import DRAIN_SECONDS


def _upstream(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: want HOST:PORT, e.g. 10.96.0.10:53")
    return host.strip("[]"), int(port)


def _first_nameserver(path: str = "/etc/resolv.conf") -> tuple[str, int]:
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    return parts[1], 53
    except OSError:
        pass
    return "127.0.0.53", 53


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ztunnel-standin", description=__doc__)
    p.add_argument("--socket", default=c.DEFAULT_ZTUNNEL_SOCKET, help="the agent's ZDS socket")
    p.add_argument("--access-log", required=True, help="file for one JSON line per connection")
    p.add_argument(
        "--ca-dir",
        default="/var/lib/ztunnel-standin/ca",
        help="testbed mesh CA (created on first use)",
    )
    p.add_argument(
        "--dns-upstream",
        type=_upstream,
        default=None,
        help="resolver for UDP DNS caught on 15053 (default: /etc/resolv.conf)",
    )
    p.add_argument(
        "--drain-seconds",
        type=float,
        default=DRAIN_SECONDS,
        help="how long a deleted pod's open connections may finish (ztunnel's default: 5)",
    )
    p.add_argument(
        "--kubeconfig",
        default=None,
        help="API server to learn from which pods speak HBONE (annotated enabled, as istiod "
        "tells ztunnel); without it, the pods this stand-in proxies",
    )
    p.add_argument("--log-level", default="info")
    # First: a SIGTERM while the CA and listeners are still being set up is a clean exit too.
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    args = p.parse_args(argv)
    configure(args.log_level)
    standin = StandIn(
        args.socket,
        args.access_log,
        args.ca_dir,
        args.dns_upstream or _first_nameserver(),
        args.drain_seconds,
        args.kubeconfig,
    )
    if done.is_set():
        return 0
    standin.start()
    done.wait()
    standin.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
