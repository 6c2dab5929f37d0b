"""The compiled form of ``redirect.c``: instructions per program plus the maps they use.

Compiled by bcc once per process, or read from a cache file keyed by a hash of the C
sources, the ``-D`` flags, the kernel release and bcc's version, so an agent restart on the
same node loads without compiling (and without clang or kernel headers). The image holds
no file descriptors: map references are relocation slots that :mod:`cni_plugin.bpf.pod`
fills with a pod's own maps before each load.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import json
import logging
import os
import struct
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from cni_plugin import constants as c
from cni_plugin.errors import ConfigError

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).resolve().parent
SOURCES = ("redirect.c", "redirect.h")
# program name -> (bpf_prog_type, expected_attach_type)
PROGRAM_TYPES = {
    "istio_ingress": (3, 0),  # BPF_PROG_TYPE_SCHED_CLS
    "istio_egress": (3, 0),
    "istio_virt_ingress": (3, 0),
    "istio_getsockopt": (25, 21),  # CGROUP_SOCKOPT, BPF_CGROUP_GETSOCKOPT
}
TC_PROGRAMS = ("istio_ingress", "istio_egress")
PROGRAMS = tuple(PROGRAM_TYPES)
# Shared by every pod on the node (`nat` is also read by istio_getsockopt).
NODE_MAPS = ("nat", "nat_fwd")
# One per pod with virtual interfaces (istio_virt_ingress is loaded per pod for them).
VIRT_PROGRAM = "istio_virt_ingress"
POD_MAPS = ("virt",)
_DIST_PACKAGES = "/usr/lib/python3/dist-packages"
_LD_IMM64 = 0x18
_PSEUDO_MAP_FD = 1


def cflags() -> list[str]:
    """The contract constants as ``-D`` flags (the header's defaults only document them)."""
    values = {
        "ZTUNNEL_OUTBOUND_PORT": c.ZTUNNEL_OUTBOUND_PORT,
        "ZTUNNEL_INBOUND_PORT": c.ZTUNNEL_INBOUND_PORT,
        "ZTUNNEL_HBONE_PORT": c.ZTUNNEL_HBONE_PORT,
        "ZTUNNEL_DNS_PORT": c.ZTUNNEL_DNS_PORT,
        "DNS_PORT": c.DNS_PORT,
        "ZTUNNEL_MARK": c.ZTUNNEL_MARK,
        "CONNMARK": c.CONNMARK,
        "MARK_MASK": c.MARK_MASK,
    }
    return [f"-D{k}={v}" for k, v in values.items()] + [f"-I{SOURCE_DIR}"]


@dataclass(frozen=True)
class MapSpec:
    name: str
    map_type: int
    key_size: int
    value_size: int
    max_entries: int


@dataclass(frozen=True)
class ProgramImage:
    """Instructions of each program with map slots (instruction index -> map index)."""

    key: str
    maps: tuple[MapSpec, ...]
    programs: dict[str, bytes]
    relocations: dict[str, tuple[tuple[int, int], ...]]

    @property
    def version(self) -> int:
        """A non-zero 32-bit build id, stored in each pod's settings map."""
        return int(self.key[:8], 16) or 1

    def map_index(self, name: str) -> int:
        for i, m in enumerate(self.maps):
            if m.name == name:
                return i
        raise KeyError(name)

    def instructions(self, program: str, map_fds: list[int]) -> bytes:
        """The program with every map slot pointing at ``map_fds`` (in ``maps`` order)."""
        insns = bytearray(self.programs[program])
        for idx, map_idx in self.relocations[program]:
            struct.pack_into("<i", insns, idx * 8 + 4, map_fds[map_idx])
        return bytes(insns)

    def to_json(self) -> str:
        return json.dumps(
            {
                "key": self.key,
                "maps": [m.__dict__ for m in self.maps],
                "programs": {k: base64.b64encode(v).decode() for k, v in self.programs.items()},
                "relocations": {k: [list(r) for r in v] for k, v in self.relocations.items()},
            }
        )

    @classmethod
    def from_json(cls, text: str) -> ProgramImage:
        d = json.loads(text)
        return cls(
            key=d["key"],
            maps=tuple(MapSpec(**m) for m in d["maps"]),
            programs={k: base64.b64decode(v) for k, v in d["programs"].items()},
            relocations={k: tuple((a, b) for a, b in v) for k, v in d["relocations"].items()},
        )


_keys: dict[Path, str] = {}


def image_key() -> str:
    """sha256 over sources, flags, kernel release/version and bcc's version (computed once
    per process and source directory)."""
    if SOURCE_DIR in _keys:
        return _keys[SOURCE_DIR]
    h = hashlib.sha256()
    for name in SOURCES:
        h.update(name.encode() + b"\0" + (SOURCE_DIR / name).read_bytes() + b"\0")
    h.update(" ".join(cflags()).encode())
    u = os.uname()
    h.update(f"{u.release}\0{u.version}\0{u.machine}".encode())
    h.update(_bcc_version().encode())
    _keys[SOURCE_DIR] = h.hexdigest()
    return _keys[SOURCE_DIR]


def _bcc_version() -> str:
    for p in Path("/usr/share/doc").glob("python3-bpfcc"):
        return p.name
    try:
        from importlib.metadata import version

        return version("bcc")
    except Exception:
        return "bcc"


_loaded: dict[str, ProgramImage] = {}
# bcc keeps process-wide state (LLVM, its module registry): two compiles at once corrupt the
# heap. Agents enrol pods on several threads, so loading the image is serialised.
_lock = threading.Lock()


def load_image(cache_dir: str | None = None) -> ProgramImage:
    """The image for this node: from memory, then ``cache_dir``, else compiled by bcc.
    Thread-safe: concurrent callers wait for one compile."""
    with _lock:
        return _load_image(cache_dir)


def _load_image(cache_dir: str | None) -> ProgramImage:
    key = image_key()
    if key in _loaded:
        return _loaded[key]
    path = Path(cache_dir) / f"redirect-{key[:16]}.json" if cache_dir else None
    if path is not None and path.is_file():
        try:
            img = ProgramImage.from_json(path.read_text())
            if img.key == key:
                _loaded[key] = img
                return img
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring unreadable bpf image cache %s", path)
    img = compile_image(key)
    _loaded[key] = img
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(img.to_json())
            os.replace(tmp, path)
        except OSError as e:
            log.warning("cannot write bpf image cache %s: %s", path, e)
    return img


def import_bcc() -> object:
    """bcc's ``BPF`` class, or a :class:`ConfigError` saying what to install."""
    if _DIST_PACKAGES not in sys.path and os.path.isdir(_DIST_PACKAGES):
        sys.path.append(_DIST_PACKAGES)
    try:
        from bcc import BPF
    except ImportError as e:
        raise ConfigError(
            f"the ebpf backend needs bcc's Python module ({e}): install python3-bpfcc "
            "(Debian/Ubuntu) or bcc-python3 with the same Python, or choose --backend iptables"
        ) from None
    return BPF


def kernel_headers_dir() -> Path:
    return Path(f"/lib/modules/{os.uname().release}/build")


def compile_image(key: str) -> ProgramImage:
    """Compile ``redirect.c`` with bcc and lift instructions and map layouts out of it."""
    bpf_cls = import_bcc()
    headers = kernel_headers_dir()
    if not (headers / "include").is_dir():
        raise ConfigError(
            f"the ebpf backend compiles against kernel headers but {headers} is missing: "
            "install linux-headers-$(uname -r) (or linux-headers-amd64) and link "
            f"{headers} and its sibling 'source' to them"
        )
    from bcc import libbcc

    src = (SOURCE_DIR / "redirect.c").read_text()
    try:
        b = bpf_cls(text=src, cflags=cflags())  # type: ignore[operator]
    except Exception as e:
        raise ConfigError(f"compiling {SOURCE_DIR / 'redirect.c'} with bcc failed: {e}") from None
    try:
        maps: list[MapSpec] = []
        fd_to_index: dict[int, int] = {}
        for name in ("cfg", *NODE_MAPS, "counters", *POD_MAPS):
            t = b.get_table(name)
            fd_to_index[int(t.map_fd)] = len(maps)
            maps.append(
                MapSpec(
                    name,
                    int(t.ttype),
                    ctypes.sizeof(t.Key),
                    ctypes.sizeof(t.Leaf),
                    int(t.max_entries),
                )
            )
        programs: dict[str, bytes] = {}
        relocations: dict[str, tuple[tuple[int, int], ...]] = {}
        for prog in PROGRAMS:
            start = libbcc.lib.bpf_function_start(b.module, prog.encode())
            size = libbcc.lib.bpf_function_size(b.module, prog.encode())
            insns = bytearray(ctypes.string_at(start, size))
            relocs: list[tuple[int, int]] = []
            for i in range(0, len(insns) // 8):
                op, regs, _off, imm = struct.unpack_from("<BBhi", insns, i * 8)
                if op == _LD_IMM64 and (regs >> 4) == _PSEUDO_MAP_FD:
                    if imm not in fd_to_index:
                        raise ConfigError(f"{prog} references an unknown map (fd {imm})")
                    relocs.append((i, fd_to_index[imm]))
                    struct.pack_into("<i", insns, i * 8 + 4, -1)
            programs[prog] = bytes(insns)
            relocations[prog] = tuple(relocs)
    finally:
        b.cleanup()
    return ProgramImage(key, tuple(maps), programs, relocations)
