"""Two pods on one wire, an app in one of them, clients in the other: for tests and benches.

``TwoPods`` builds network namespaces ``<prefix>a-<id>`` and ``<prefix>b-<id>`` joined by a
veth pair (``10.<n>.0.1/24`` and ``.2/24``, plus ``fd00:<n>::1/64`` and ``::2`` with ``ipv6``),
loopback up, and removes both on ``close()``
(the veth goes with them). ``AppServer`` is a tiny HTTP/1.1 server whose listening socket
lives in a pod namespace; ``http_get`` is a client whose socket lives in another. Nothing
here touches the host's namespace.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import subprocess
import threading
from dataclasses import dataclass

from cni_plugin import constants as c
from cni_plugin.netns import run_in_netns


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


@dataclass
class Pod:
    name: str  # netns name
    ip: str
    dev: str
    ip6: str | None = None

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"


class TwoPods:
    def __init__(self, prefix: str = "icnit-", subnet: int = 77, ipv6: bool = False) -> None:
        tag = secrets.token_hex(3)
        v6 = (f"fd00:{subnet}::1", f"fd00:{subnet}::2") if ipv6 else (None, None)
        self.a = Pod(f"{prefix}a-{tag}", f"10.{subnet}.0.1", f"va{tag}", v6[0])
        self.b = Pod(f"{prefix}b-{tag}", f"10.{subnet}.0.2", f"vb{tag}", v6[1])
        made: list[str] = []
        try:
            for p in (self.a, self.b):
                _ip("netns", "add", p.name)
                made.append(p.name)
                _ip("-n", p.name, "link", "set", "lo", "up")
            _ip(
                "-n",
                self.a.name,
                "link",
                "add",
                self.a.dev,
                "type",
                "veth",
                "peer",
                "name",
                self.b.dev,
                "netns",
                self.b.name,
            )
            for p in (self.a, self.b):
                _ip("-n", p.name, "addr", "add", f"{p.ip}/24", "dev", p.dev)
                if p.ip6:
                    _ip("-n", p.name, "addr", "add", f"{p.ip6}/64", "dev", p.dev, "nodad")
                _ip("-n", p.name, "link", "set", p.dev, "up")
        except BaseException:
            for name in made:
                subprocess.run(["ip", "netns", "del", name], capture_output=True)
            raise

    def close(self) -> None:
        for p in (self.a, self.b):
            subprocess.run(["ip", "netns", "del", p.name], capture_output=True)


class AppServer:
    """HTTP/1.1 on ``ip:port`` inside ``netns_path``: answers ``hello from <name>`` plus the
    request line, then closes. Remembers each client's address (to see who dialled it)."""

    def __init__(self, netns_path: str, ip: str, port: int, name: str) -> None:
        self.name = name
        self.clients: list[tuple[str, int]] = []

        def listen() -> socket.socket:
            s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((ip, port))
            s.listen(128)
            return s

        self.sock = run_in_netns(netns_path, listen)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, addr = self.sock.accept()
            except OSError:
                return
            self.clients.append(addr)
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            data = b""
            try:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    data += chunk
                body = f"hello from {self.name}: ".encode() + data.split(b"\r\n", 1)[0]
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n"
                    b"\r\n%s" % (len(body), body)
                )
            except OSError:
                return

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(5)


def client_socket(netns_path: str, *, marked: bool = False, ipv6: bool = False) -> socket.socket:
    """A TCP socket inside a pod; ``marked`` sets SO_MARK 1337 (bypasses the pod's capture)."""

    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET6 if ipv6 else socket.AF_INET, socket.SOCK_STREAM)
        if marked:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, c.ZTUNNEL_MARK)
        return s

    return run_in_netns(netns_path, make)


def http_get(sock: socket.socket, ip: str, port: int, path: str, timeout: float = 10) -> bytes:
    """Send one request on ``sock`` (made by :func:`client_socket`) and read to EOF."""
    with sock:
        sock.settimeout(timeout)
        sock.connect((ip, port))
        host = f"[{ip}]" if ":" in ip else ip
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        out = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return out
            out += chunk
