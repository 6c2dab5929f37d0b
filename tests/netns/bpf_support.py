"""The eBPF backend's entry in the behaviour table, and its bpffs hygiene for tests.

Every test process uses its own pin root under ``/sys/fs/bpf`` (``icnit-<pid>``), removed
at exit together with everything pinned below it; the getsockopt link detaches as its pin
goes. ``unavailable`` says why the backend cannot run here (skips name the reason).
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

PIN_ROOT = f"/sys/fs/bpf/icnit-{os.getpid()}"
CACHE_DIR = f"/tmp/icnit-bpf-cache-{os.getuid()}"


def _cleanup() -> None:
    shutil.rmtree(PIN_ROOT, ignore_errors=True)


atexit.register(_cleanup)


def options() -> dict[str, Any]:
    return {"pin_root": PIN_ROOT, "cache_dir": CACHE_DIR}


_reason: list[str | None] = []


def unavailable() -> str | None:
    """Why the eBPF backend cannot run here (e.g. a kernel without headers under qemu), or
    None. Probed once per process."""
    if not _reason:
        from cni_plugin.bpf.availability import probe

        avail = probe(PIN_ROOT, CACHE_DIR)
        _reason.append(None if avail.ok else avail.reason)
    return _reason[0]


def skip_if_unavailable() -> None:
    import pytest

    reason = unavailable()
    if reason:
        pytest.skip(f"ebpf backend unavailable on this machine: {reason}")


def delete_lo_filter(backend: object, ns: str) -> str:
    """Detach our tc filter from lo's ingress."""
    subprocess.run(["tc", "-n", ns, "filter", "del", "dev", "lo", "ingress", "pref", "1"],
                   check=True)  # fmt: skip
    return "deleted tc filter lo ingress pref 1"


def delete_egress_filter(backend: object, ns: str) -> str:
    """Detach our tc filter from eth0's egress."""
    subprocess.run(["tc", "-n", ns, "filter", "del", "dev", "eth0", "egress", "pref", "1"],
                   check=True)  # fmt: skip
    return "deleted tc filter eth0 egress pref 1"


def delete_policy_rule(backend: object, ns: str) -> str:
    """Delete the IPv4 fwmark policy rule."""
    subprocess.run(["ip", "-n", ns, "rule", "del", "pref", "32764"], check=True)
    return "deleted ip rule pref 32764"


def delete_getsockopt_link(backend: object, ns: str) -> str:
    """Unpin the node's getsockopt link (it detaches): outbound original destinations."""
    root = Path(str(getattr(backend, "pin_root", PIN_ROOT)))
    links = list(root.glob("node-*/getsockopt_link"))
    for link in links:
        link.unlink()
    return f"unpinned {', '.join(map(str, links))}"


TAMPERS = (
    ("tc-lo", delete_lo_filter),
    ("tc-egress", delete_egress_filter),
    ("policy-rule", delete_policy_rule),
    ("getsockopt-link", delete_getsockopt_link),
)
