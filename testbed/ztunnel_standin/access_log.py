"""One JSON line per proxied connection, with ztunnel's access-log field names."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import IO


@dataclass
class ConnRecord:
    direction: str  # "outbound" | "inbound"
    src_addr: str
    dst_addr: str
    start: float  # time.monotonic() at accept
    src_workload: str | None = None
    src_namespace: str | None = None
    src_identity: str | None = None
    dst_hbone_addr: str | None = None
    dst_service: str | None = None
    dst_workload: str | None = None
    dst_namespace: str | None = None
    dst_identity: str | None = None
    bytes_sent: int = 0
    bytes_recv: int = 0
    error: str | None = None  # set when the connection failed before carrying data

    def fields(self) -> dict[str, object]:
        out: dict[str, object] = {
            "src.addr": self.src_addr,
            "src.workload": self.src_workload,
            "src.namespace": self.src_namespace,
            "src.identity": self.src_identity,
            "dst.addr": self.dst_addr,
            "dst.hbone_addr": self.dst_hbone_addr,
            "dst.service": self.dst_service,
            "dst.workload": self.dst_workload,
            "dst.namespace": self.dst_namespace,
            "dst.identity": self.dst_identity,
            "direction": self.direction,
            "bytes_sent": self.bytes_sent,
            "bytes_recv": self.bytes_recv,
            "duration": f"{(time.monotonic() - self.start) * 1000:.0f}ms",
        }
        if self.error is not None:
            out["error"] = self.error
        return out


class AccessLog:
    """Appends lines to a file (line-buffered, so readers see whole lines at once)."""

    def __init__(self, path: str) -> None:
        self._f: IO[str] = open(path, "a", buffering=1)  # noqa: SIM115 (closed in close())
        self._lock = threading.Lock()

    def write(self, rec: ConnRecord) -> None:
        line = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "level": "info",
            "scope": "access",
            "message": "connection complete",
            **rec.fields(),
        }
        with self._lock:
            self._f.write(json.dumps(line) + "\n")

    def close(self) -> None:
        self._f.close()
