"""The ``bpf(2)`` system call, directly through ctypes: maps, program loads, pins, test runs.

bcc is only the compiler here (see :mod:`cni_plugin.bpf.image`); loading a program per pod,
creating its maps, pinning and running programs on crafted packets go through the kernel's
own interface, so a cached program image needs neither clang nor kernel headers.
Every function returns owned file descriptors the caller closes; errors raise ``OSError``
with the kernel's errno (the verifier log is attached for program loads).
"""

from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_BPF = 321  # x86_64

MAP_CREATE = 0
MAP_LOOKUP_ELEM = 1
MAP_UPDATE_ELEM = 2
MAP_DELETE_ELEM = 3
MAP_GET_NEXT_KEY = 4
PROG_LOAD = 5
OBJ_PIN = 6
OBJ_GET = 7
PROG_TEST_RUN = 10
OBJ_GET_INFO_BY_FD = 15
LINK_CREATE = 28

PROG_TYPE_SCHED_CLS = 3
MAP_TYPE_HASH = 1
MAP_TYPE_ARRAY = 2
MAP_TYPE_LRU_HASH = 9

_ATTR_SIZE = 144


def _call(cmd: int, attr: ctypes.Array[ctypes.c_char]) -> int:
    ret = int(_libc.syscall(_SYS_BPF, cmd, attr, _ATTR_SIZE))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def _attr() -> ctypes.Array[ctypes.c_char]:
    return ctypes.create_string_buffer(_ATTR_SIZE)


def _addr(buf: ctypes.Array[ctypes.c_char] | None) -> int:
    return 0 if buf is None else ctypes.addressof(buf)


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int, name: str) -> int:
    a = _attr()
    struct.pack_into("IIIII", a, 0, map_type, key_size, value_size, max_entries, 0)
    struct.pack_into("16s", a, 28, name.encode()[:15])
    return _call(MAP_CREATE, a)


def map_update(fd: int, key: bytes, value: bytes) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    a = _attr()
    struct.pack_into("IxxxxQQQ", a, 0, fd, _addr(k), _addr(v), 0)
    _call(MAP_UPDATE_ELEM, a)


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    a = _attr()
    struct.pack_into("IxxxxQQ", a, 0, fd, _addr(k), _addr(v))
    try:
        _call(MAP_LOOKUP_ELEM, a)
    except FileNotFoundError:
        return None
    return v.raw


def map_keys(fd: int, key_size: int) -> list[bytes]:
    """Every key of a (hash) map, walked with ``BPF_MAP_GET_NEXT_KEY``."""
    keys: list[bytes] = []
    prev: ctypes.Array[ctypes.c_char] | None = None
    while True:
        nxt = ctypes.create_string_buffer(key_size)
        a = _attr()
        struct.pack_into("IxxxxQQ", a, 0, fd, _addr(prev), _addr(nxt))
        try:
            _call(MAP_GET_NEXT_KEY, a)
        except FileNotFoundError:
            return keys
        keys.append(nxt.raw)
        prev = nxt


def prog_load(
    prog_type: int, insns: bytes, name: str, attach_type: int = 0, license: str = "GPL"
) -> int:
    """Load ``insns``; on a verifier rejection the ``OSError`` message carries its log."""
    ins = ctypes.create_string_buffer(insns, len(insns))
    lic = ctypes.create_string_buffer(license.encode())
    a = _attr()
    struct.pack_into("IIQQ", a, 0, prog_type, len(insns) // 8, _addr(ins), _addr(lic))
    struct.pack_into("16s", a, 48, name.encode()[:15])
    struct.pack_into("I", a, 68, attach_type)
    try:
        return _call(PROG_LOAD, a)
    except OSError:
        pass
    log = ctypes.create_string_buffer(1 << 20)
    struct.pack_into("IIQ", a, 24, 1, len(log), _addr(log))
    try:
        return _call(PROG_LOAD, a)
    except OSError as e:
        text = log.value.decode(errors="replace").strip().splitlines()[-4:]
        raise OSError(e.errno, f"{e.strerror}; verifier: " + " | ".join(text)) from None


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    """A BPF link attaching ``prog_fd`` to ``target_fd`` (e.g. a cgroup directory)."""
    a = _attr()
    struct.pack_into("IIII", a, 0, prog_fd, target_fd, attach_type, 0)
    return _call(LINK_CREATE, a)


def obj_pin(fd: int, path: str) -> None:
    p = ctypes.create_string_buffer(path.encode())
    a = _attr()
    struct.pack_into("QI", a, 0, _addr(p), fd)
    _call(OBJ_PIN, a)


def obj_get(path: str) -> int:
    p = ctypes.create_string_buffer(path.encode())
    a = _attr()
    struct.pack_into("QI", a, 0, _addr(p), 0)
    return _call(OBJ_GET, a)


@dataclass(frozen=True)
class ProgInfo:
    prog_type: int
    prog_id: int
    tag: str
    name: str


def prog_info(fd: int) -> ProgInfo:
    info = ctypes.create_string_buffer(256)
    a = _attr()
    struct.pack_into("IIQ", a, 0, fd, len(info), _addr(info))
    _call(OBJ_GET_INFO_BY_FD, a)
    ptype, pid = struct.unpack_from("II", info, 0)
    tag = info.raw[8:16].hex()
    name = info.raw[64:80].split(b"\0", 1)[0].decode()
    return ProgInfo(ptype, pid, tag, name)


@dataclass(frozen=True)
class MapInfo:
    map_type: int
    map_id: int
    key_size: int
    value_size: int
    max_entries: int
    name: str


def map_info(fd: int) -> MapInfo:
    info = ctypes.create_string_buffer(128)
    a = _attr()
    struct.pack_into("IIQ", a, 0, fd, len(info), _addr(info))
    _call(OBJ_GET_INFO_BY_FD, a)
    mtype, mid, ks, vs, me = struct.unpack_from("IIIII", info, 0)
    name = info.raw[24:40].split(b"\0", 1)[0].decode()
    return MapInfo(mtype, mid, ks, vs, me, name)


@dataclass(frozen=True)
class TestRun:
    """What ``BPF_PROG_TEST_RUN`` returned: the verdict, the packet and the context after."""

    retval: int
    data: bytes
    ctx: bytes


def prog_test_run(fd: int, data: bytes, ctx: bytes = b"") -> TestRun:
    din = ctypes.create_string_buffer(data, len(data))
    dout = ctypes.create_string_buffer(len(data) + 256)
    cin = ctypes.create_string_buffer(ctx, len(ctx)) if ctx else None
    cout = ctypes.create_string_buffer(len(ctx)) if ctx else None
    a = _attr()
    struct.pack_into(
        "IIIIQQIIIIQQ",
        a,
        0,
        fd,
        0,
        len(data),
        len(dout),
        _addr(din),
        _addr(dout),
        1,
        0,
        len(ctx),
        len(ctx),
        _addr(cin),
        _addr(cout),
    )
    _call(PROG_TEST_RUN, a)
    retval, _, out_size = struct.unpack_from("III", a, 4)
    return TestRun(retval, dout.raw[:out_size], cout.raw if cout is not None else b"")
