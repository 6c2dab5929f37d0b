"""One pod's own bpffs state: ``<pin_root>/pods/<netns inode>/``.

Holds the ``state`` map (what :class:`~cni_plugin.bpf.backend.EbpfBackend` changed in the
namespace and must undo: the clsact qdiscs it created, lo's ``accept_local`` and
``route_localnet`` values it replaced, the build it attached) and a second pin of each
attached program, so that an agent that restarts, or another agent, knows exactly what is
ours and can verify or undo it without any memory of its own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

from cni_plugin.bpf import syscall

STATE_MAGIC = b"icni"
UNTOUCHED = 0xFFFFFFFF
MAX_IFACES = 8
# magic, build, lo's accept_local and route_localnet before us, n, created qdisc ifindexes
_FORMAT = f"<4sIIII{MAX_IFACES}I"
_SIZE = struct.calcsize(_FORMAT)
STATE = "state"


@dataclass
class PodState:
    version: int
    accept_local_orig: int = UNTOUCHED
    route_localnet_orig: int = UNTOUCHED
    created_qdiscs: list[int] = field(default_factory=list)

    def pack(self) -> bytes:
        idx = (self.created_qdiscs + [0] * MAX_IFACES)[:MAX_IFACES]
        n = min(len(self.created_qdiscs), MAX_IFACES)
        return struct.pack(
            _FORMAT,
            STATE_MAGIC,
            self.version,
            self.accept_local_orig,
            self.route_localnet_orig,
            n,
            *idx,
        )

    @classmethod
    def unpack(cls, raw: bytes) -> PodState | None:
        magic, version, accept_local, localnet, n, *idx = struct.unpack(_FORMAT, raw[:_SIZE])
        if magic != STATE_MAGIC:
            return None
        return cls(version, accept_local, localnet, list(idx[: min(n, MAX_IFACES)]))


def pod_dir(pin_root: Path, netns_inode: int) -> Path:
    return pin_root / "pods" / str(netns_inode)


def read_state(directory: Path) -> PodState | None:
    path = directory / STATE
    if not path.exists():
        return None
    try:
        fd = syscall.obj_get(str(path))
    except OSError:
        return None
    try:
        raw = syscall.map_lookup(fd, struct.pack("<I", 0), _SIZE)
    finally:
        os.close(fd)
    return PodState.unpack(raw) if raw else None


def write(directory: Path, state: PodState, prog_fds: dict[str, int]) -> None:
    """Create the pod's directory with its state map and program pins (fresh)."""
    directory.mkdir(parents=True, exist_ok=False)
    fd = syscall.map_create(syscall.MAP_TYPE_ARRAY, 4, _SIZE, 1, "icni_pod")
    try:
        syscall.map_update(fd, struct.pack("<I", 0), state.pack())
        syscall.obj_pin(fd, str(directory / STATE))
    finally:
        os.close(fd)
    for name, pfd in prog_fds.items():
        syscall.obj_pin(pfd, str(directory / name))


def repin(directory: Path, prog_fds: dict[str, int]) -> None:
    """Point the pod's program pins at other programs (its state map stays)."""
    for name, pfd in prog_fds.items():
        path = directory / name
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        syscall.obj_pin(pfd, str(path))


def pinned_prog_id(directory: Path, name: str) -> int | None:
    try:
        fd = syscall.obj_get(str(directory / name))
    except OSError:
        return None
    try:
        return syscall.prog_info(fd).prog_id
    finally:
        os.close(fd)


def delete(directory: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(directory)
