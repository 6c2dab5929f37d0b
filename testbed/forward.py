"""A TCP forwarder from the host's loopback into the node's network namespace.

Role: let host-side clients (pytest, ``kubectl``, the Python kube client) reach the API
server, which listens only inside the node netns, without adding any link, address, route or
rule to the host's namespace. Each accepted loopback connection is paired with a socket
*created* inside the node netns (on a short-lived thread, via ``run_in_netns``) and bytes are
copied both ways; TLS passes through untouched (the serving cert has 127.0.0.1 as a SAN).

Run as ``python -m testbed.forward --netns PATH --target IP:PORT --port-file FILE``; it binds
127.0.0.1 on a free port, writes the port to FILE, and serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import sys
import threading
from pathlib import Path

from cni_plugin.netns import run_in_netns


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def _serve_one(client: socket.socket, netns: str, target: tuple[str, int]) -> None:
    try:
        upstream = run_in_netns(netns, lambda: socket.create_connection(target, timeout=5))
    except OSError:
        client.close()
        return
    upstream.settimeout(None)
    t = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
    t.start()
    _pump(client, upstream)
    t.join()
    client.close()
    upstream.close()


def serve(netns: str, target: tuple[str, int], port_file: Path) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    tmp = port_file.with_suffix(".tmp")
    tmp.write_text(str(listener.getsockname()[1]))
    tmp.rename(port_file)
    while True:
        client, _ = listener.accept()
        threading.Thread(target=_serve_one, args=(client, netns, target), daemon=True).start()


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m testbed.forward")
    p.add_argument("--netns", required=True)
    p.add_argument("--target", required=True, help="IP:PORT inside the netns")
    p.add_argument("--port-file", required=True, type=Path)
    a = p.parse_args()
    host, _, port = a.target.rpartition(":")
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    try:
        serve(a.netns, (host, int(port)), a.port_file)
    except KeyboardInterrupt:
        return 0
    except OSError as e:
        print(f"testbed forward: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
