"""The loaded, pinned programs of one settings variant, shared by every pod using it.

Loading costs the verifier about a millisecond per program, so programs are loaded once per
(image build, variant) and pinned under ``<pin_root>/progs/<build>-<variant>/`` together
with their maps: ``cfg`` (the variant's settings), ``dns_nat`` (UDP DNS replies' way back)
and ``counters``. A restarted agent finds the pins and adopts them without compiling or
loading anything; pods keep pointing at the programs they were attached with throughout.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from cni_plugin.bpf import syscall
from cni_plugin.bpf.image import PROGRAMS, ProgramImage
from cni_plugin.redirection.settings import RedirectSettings

F_DNS_CAPTURE = 1
F_BYPASS_INBOUND = 2
F_IPV6 = 4
SETTINGS_FORMAT = "<II16sII"  # struct settings in redirect.h
COUNTER_NAMES = (
    "outbound",
    "inbound",
    "dns_tcp",
    "dns_udp",
    "dns_reply",
    "no_listener",
    "local_redirect",
)


def settings_flags(s: RedirectSettings) -> int:
    return (
        (F_DNS_CAPTURE if s.dns_capture else 0)
        | (F_BYPASS_INBOUND if s.bypass_inbound else 0)
        | (F_IPV6 if s.ipv6 else 0)
    )


def settings_value(s: RedirectSettings, version: int) -> bytes:
    """The ``cfg`` map's value for ``s`` (addresses in network byte order)."""
    probe4 = int.from_bytes(ipaddress.IPv4Address(s.probe_snat_ipv4).packed, "little")
    probe6 = ipaddress.IPv6Address(s.probe_snat_ipv6).packed
    return struct.pack(SETTINGS_FORMAT, settings_flags(s), probe4, probe6, version, 0)


def variant_name(image: ProgramImage, s: RedirectSettings) -> str:
    """Directory name of the variant: build id, flags, the probe addresses in hex (bpffs
    refuses dots in names)."""
    v4 = ipaddress.IPv4Address(s.probe_snat_ipv4).packed.hex()
    v6 = ipaddress.IPv6Address(s.probe_snat_ipv6).packed.hex()
    return f"{image.version:08x}-f{settings_flags(s)}-{v4}-{v6}"


@dataclass
class SharedPrograms:
    """Open descriptors of one variant's programs and maps (close when done)."""

    path: Path
    prog_fds: dict[str, int]
    map_fds: dict[str, int]

    def close(self) -> None:
        for fd in [*self.prog_fds.values(), *self.map_fds.values()]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.prog_fds.clear()
        self.map_fds.clear()

    def prog_id(self, name: str) -> int:
        return syscall.prog_info(self.prog_fds[name]).prog_id

    def counters(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for i, name in enumerate(COUNTER_NAMES):
            raw = syscall.map_lookup(self.map_fds["counters"], struct.pack("<I", i), 8)
            out[name] = struct.unpack("<Q", raw)[0] if raw else 0
        return out


def open_or_load(image: ProgramImage, s: RedirectSettings, pin_root: Path) -> SharedPrograms:
    """Adopt the pinned variant if present, else load and pin it (atomically, by rename)."""
    final = pin_root / "progs" / variant_name(image, s)
    if final.is_dir():
        try:
            return _open(final, image)
        except OSError:
            shutil.rmtree(final, ignore_errors=True)  # half-made by a crashed agent
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"tmp-{os.getpid()}-{final.name}")
    shared = _load(image, s)
    try:
        tmp.mkdir()
        for name, fd in [*shared.prog_fds.items(), *shared.map_fds.items()]:
            syscall.obj_pin(fd, str(tmp / name))
        try:
            os.rename(tmp, final)
        except OSError:
            # Another agent pinned the same variant first: use its objects.
            shutil.rmtree(tmp, ignore_errors=True)
            shared.close()
            return _open(final, image)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        shared.close()
        raise
    shared.path = final
    return shared


def _open(path: Path, image: ProgramImage) -> SharedPrograms:
    shared = SharedPrograms(path, {}, {})
    try:
        for name in PROGRAMS:
            shared.prog_fds[name] = syscall.obj_get(str(path / name))
        for m in image.maps:
            shared.map_fds[m.name] = syscall.obj_get(str(path / m.name))
    except BaseException:
        shared.close()
        raise
    return shared


def _load(image: ProgramImage, s: RedirectSettings) -> SharedPrograms:
    shared = SharedPrograms(Path(), {}, {})
    try:
        for m in image.maps:
            shared.map_fds[m.name] = syscall.map_create(
                m.map_type, m.key_size, m.value_size, m.max_entries, m.name
            )
        syscall.map_update(
            shared.map_fds["cfg"], struct.pack("<I", 0), settings_value(s, image.version)
        )
        fds = [shared.map_fds[m.name] for m in image.maps]
        for name in PROGRAMS:
            shared.prog_fds[name] = syscall.prog_load(
                syscall.PROG_TYPE_SCHED_CLS, image.instructions(name, fds), name
            )
    except BaseException:
        shared.close()
        raise
    return shared


def open_existing(
    image: ProgramImage, s: RedirectSettings, pin_root: Path
) -> SharedPrograms | None:
    """The pinned variant for ``s`` if present (never loads or pins anything)."""
    path = pin_root / "progs" / variant_name(image, s)
    if not path.is_dir():
        return None
    try:
        return _open(path, image)
    except OSError:
        return None
