"""Loaded, pinned BPF objects shared by pods: the node's and each settings variant's.

Node-wide (``<pin_root>/node-<build>/``): the ``nat`` map (captured connections' original
destinations by the rewritten client address and port; pod addresses are unique on a node),
``nat_fwd`` (the source port each captured original 5-tuple was given) and
``istio_getsockopt`` attached to the cgroup v2 root through a pinned link, answering
ztunnel's ``SO_ORIGINAL_DST``.

Per variant (``<pin_root>/progs/<build>-<flags>-<probe addresses>/``): ``istio_ingress``
and ``istio_egress`` with their ``cfg`` (the variant's settings) and ``counters`` maps.
Loading costs the verifier about a millisecond per program, so this happens once per
agent (or never: a restarted agent adopts the pins) instead of once per pod.
Creation pins into a temporary directory renamed into place, so a crash never leaves a
half-made variant under its real name.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

from cni_plugin.bpf import syscall
from cni_plugin.bpf.image import (
    NODE_MAPS,
    POD_MAPS,
    PROGRAM_TYPES,
    TC_PROGRAMS,
    VIRT_PROGRAM,
    ProgramImage,
)
from cni_plugin.redirection.settings import RedirectSettings

F_DNS_CAPTURE = 1
F_BYPASS_INBOUND = 2
F_IPV6 = 4
F_INBOUND_NAT = 8
F_DRAIN = 16
SETTINGS_FORMAT = "<II16sII"  # struct settings in redirect.h
NAT_KEY_FORMAT = "<16sHBB16s"  # struct nat_key
NAT_VAL_FORMAT = "<16sHHHHQ"  # struct nat_val
NAT_TUPLE_FORMAT = "<16s16sHHBBH"  # struct nat_tuple
NAT_FWD_VAL_FORMAT = "<HH"  # struct nat_fwd_val
VIRT_ADDR_FORMAT = "<4s16s"  # struct virt_addr (addresses in network byte order)
COUNTER_NAMES = (
    "outbound",
    "inbound",
    "dns_tcp",
    "dns_udp",
    "reply",
    "no_listener",
    "local_redirect",
    "virtual",
    "port_remap",
    "no_port",
)
CGROUP_GETSOCKOPT = 21
GETSOCKOPT_LINK = "getsockopt_link"
NODE_PINS = (*NODE_MAPS, GETSOCKOPT_LINK)


def settings_flags(s: RedirectSettings, inbound_nat: bool = False) -> int:
    return (
        (F_DNS_CAPTURE if s.dns_capture else 0)
        | (F_BYPASS_INBOUND if s.bypass_inbound else 0)
        | (F_IPV6 if s.ipv6 else 0)
        | (F_INBOUND_NAT if inbound_nat else 0)
        | (F_DRAIN if s.draining else 0)
    )


def settings_value(s: RedirectSettings, version: int, inbound_nat: bool = False) -> bytes:
    """The ``cfg`` map's value for ``s`` (addresses in network byte order)."""
    probe4 = int.from_bytes(ipaddress.IPv4Address(s.probe_snat_ipv4).packed, "little")
    probe6 = ipaddress.IPv6Address(s.probe_snat_ipv6).packed
    flags = settings_flags(s, inbound_nat)
    return struct.pack(SETTINGS_FORMAT, flags, probe4, probe6, version, 0)


def variant_name(image: ProgramImage, s: RedirectSettings, inbound_nat: bool = False) -> str:
    """Directory name of the variant: build id, flags, the probe addresses in hex (bpffs
    refuses dots in names)."""
    v4 = ipaddress.IPv4Address(s.probe_snat_ipv4).packed.hex()
    v6 = ipaddress.IPv6Address(s.probe_snat_ipv6).packed.hex()
    return f"{image.version:08x}-f{settings_flags(s, inbound_nat)}-{v4}-{v6}"


@dataclass
class Pinned:
    """Open descriptors of pinned objects by name (close when done)."""

    path: Path
    fds: dict[str, int]
    _ids: dict[str, int] = field(default_factory=dict)

    def close(self) -> None:
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()

    def prog_id(self, name: str) -> int:
        if name not in self._ids:
            self._ids[name] = syscall.prog_info(self.fds[name]).prog_id
        return self._ids[name]

    def counters(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for i, name in enumerate(COUNTER_NAMES):
            raw = syscall.map_lookup(self.fds["counters"], struct.pack("<I", i), 8)
            out[name] = struct.unpack("<Q", raw)[0] if raw else 0
        return out


def _open(path: Path, names: list[str]) -> Pinned:
    pinned = Pinned(path, {})
    try:
        for name in names:
            pinned.fds[name] = syscall.obj_get(str(path / name))
    except BaseException:
        pinned.close()
        raise
    return pinned


def _publish(final: Path, made: Pinned, names: list[str]) -> Pinned:
    """Pin ``made`` under ``final`` atomically; adopt a concurrent winner's objects."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"tmp-{os.getpid()}-{final.name}")
    try:
        tmp.mkdir()
        for name, fd in made.fds.items():
            syscall.obj_pin(fd, str(tmp / name))
        try:
            os.rename(tmp, final)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            made.close()
            return _open(final, names)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        made.close()
        raise
    made.path = final
    return made


def load_program(image: ProgramImage, name: str, map_fds: dict[str, int]) -> int:
    ptype, attach = PROGRAM_TYPES[name]
    fds = [map_fds[m.name] for m in image.maps]
    return syscall.prog_load(ptype, image.instructions(name, fds), name, attach)


def node_dir(pin_root: Path, image: ProgramImage) -> Path:
    """Per build: an upgraded agent's programs never share a map whose layout may differ;
    pods still on the old build keep the old map and getsockopt program."""
    return pin_root / f"node-{image.version:08x}"


def node_objects(image: ProgramImage, pin_root: Path, cgroup: str) -> Pinned:
    """The node's ``nat`` map, creating it and attaching ``istio_getsockopt`` to
    ``cgroup`` (a cgroup v2 directory) the first time."""
    final = node_dir(pin_root, image)
    names = list(NODE_PINS)
    if final.is_dir():
        try:
            return _open(final, names)
        except OSError:
            shutil.rmtree(final, ignore_errors=True)  # half-made by a crashed agent
    made = Pinned(Path(), {})
    try:
        for m in image.maps:
            if m.name in NODE_MAPS:
                made.fds[m.name] = syscall.map_create(
                    m.map_type, m.key_size, m.value_size, m.max_entries, m.name
                )
        # Placeholder maps fill the variant-only slots the getsockopt program never uses.
        scratch = _scratch_maps(image, made.fds)
        try:
            prog = load_program(image, "istio_getsockopt", {**scratch, **made.fds})
        finally:
            for fd in scratch.values():
                os.close(fd)
        try:
            cg = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
            try:
                made.fds[GETSOCKOPT_LINK] = syscall.link_create(prog, cg, CGROUP_GETSOCKOPT)
            finally:
                os.close(cg)
        finally:
            os.close(prog)
    except BaseException:
        made.close()
        raise
    return _publish(final, made, names)


def _scratch_maps(image: ProgramImage, have: dict[str, int]) -> dict[str, int]:
    return {
        m.name: syscall.map_create(m.map_type, m.key_size, m.value_size, 1, m.name)
        for m in image.maps
        if m.name not in have
    }


def variant_objects(
    image: ProgramImage,
    s: RedirectSettings,
    pin_root: Path,
    node: Pinned,
    inbound_nat: bool = False,
) -> Pinned:
    """Adopt the pinned variant for ``s`` if present, else load and pin it."""
    final = pin_root / "progs" / variant_name(image, s, inbound_nat)
    names = [*TC_PROGRAMS, *_variant_maps(image)]
    if final.is_dir():
        try:
            return _open(final, names)
        except OSError:
            shutil.rmtree(final, ignore_errors=True)
    made = Pinned(Path(), {})
    try:
        for m in image.maps:
            if m.name in _variant_maps(image):
                made.fds[m.name] = syscall.map_create(
                    m.map_type, m.key_size, m.value_size, m.max_entries, m.name
                )
        value = settings_value(s, image.version, inbound_nat)
        syscall.map_update(made.fds["cfg"], struct.pack("<I", 0), value)
        have = {**made.fds, **{n: node.fds[n] for n in NODE_MAPS}}
        scratch = _scratch_maps(image, have)  # the per-pod slots these programs never use
        try:
            for name in TC_PROGRAMS:
                made.fds[name] = load_program(image, name, {**scratch, **have})
        finally:
            for fd in scratch.values():
                os.close(fd)
    except BaseException:
        made.close()
        raise
    return _publish(final, made, names)


def _variant_maps(image: ProgramImage) -> list[str]:
    return [m.name for m in image.maps if m.name not in NODE_MAPS and m.name not in POD_MAPS]


def virt_value(addr4: str | None, addr6: str | None) -> bytes:
    """The ``virt`` map's value for one interface (zero for a family it has no address of)."""
    v4 = ipaddress.IPv4Address(addr4).packed if addr4 else bytes(4)
    v6 = ipaddress.IPv6Address(addr6).packed if addr6 else bytes(16)
    return struct.pack(VIRT_ADDR_FORMAT, v4, v6)


def virt_objects(
    image: ProgramImage,
    shared: Pinned,
    node: Pinned,
    addresses: dict[int, tuple[str | None, str | None]],
) -> Pinned:
    """A pod's own ``virt`` map (ifindex -> the interface's address) and the
    ``istio_virt_ingress`` program over it, sharing the variant's ``cfg``/``counters`` and
    the node's ``nat``. Not pinned here: the pod's directory holds them."""
    made = Pinned(Path(), {})
    try:
        spec = image.maps[image.map_index("virt")]
        fd = syscall.map_create(spec.map_type, spec.key_size, spec.value_size,
                                spec.max_entries, spec.name)  # fmt: skip
        made.fds["virt"] = fd
        for ifindex, (a4, a6) in addresses.items():
            syscall.map_update(fd, struct.pack("<I", ifindex), virt_value(a4, a6))
        maps = {**{n: shared.fds[n] for n in _variant_maps(image)}, "virt": fd}
        maps.update({n: node.fds[n] for n in NODE_MAPS})
        made.fds[VIRT_PROGRAM] = load_program(image, VIRT_PROGRAM, maps)
    except BaseException:
        made.close()
        raise
    return made


def virt_entries(fd: int) -> dict[int, bytes]:
    """Every entry of a pod's ``virt`` map: ifindex -> raw value."""
    size = struct.calcsize(VIRT_ADDR_FORMAT)
    out: dict[int, bytes] = {}
    for key in syscall.map_keys(fd, 4):
        raw = syscall.map_lookup(fd, key, size)
        if raw:
            out[struct.unpack("<I", key)[0]] = raw
    return out


def open_node(image: ProgramImage, pin_root: Path) -> Pinned:
    """The node's pinned maps (for a per-pod load; they exist once a variant exists)."""
    return _open(node_dir(pin_root, image), list(NODE_MAPS))


def existing_variant(
    image: ProgramImage, s: RedirectSettings, pin_root: Path, inbound_nat: bool = False
) -> Pinned | None:
    """The pinned variant for ``s`` if present (never loads or pins anything)."""
    path = pin_root / "progs" / variant_name(image, s, inbound_nat)
    names = [*TC_PROGRAMS, *_variant_maps(image)]
    try:
        return _open(path, names)
    except OSError:
        return None


def nat_entry(
    node: Pinned, family: int, proto: int, addr: bytes, port: int, local: bytes = b""
) -> bytes | None:
    """The raw ``nat`` value for a client (tests and diagnostics); ``local`` is the pod
    address for inbound entries."""
    key = struct.pack(
        NAT_KEY_FORMAT, addr.ljust(16, b"\0"), port, family, proto, local.ljust(16, b"\0")
    )
    return syscall.map_lookup(node.fds["nat"], key, struct.calcsize(NAT_VAL_FORMAT))
