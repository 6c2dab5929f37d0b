"""The program image: map slots are relocated per load, JSON round-trips, the cache key
follows the sources, and a cached image is used without compiling."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from cni_plugin.bpf import image
from cni_plugin.rtnetlink import parse_attrs

LD_IMM64_MAP = bytes([0x18, 0x11, 0, 0]) + struct.pack("<i", -1) + bytes(8)
EXIT = bytes([0x95, 0, 0, 0, 0, 0, 0, 0])


def _img() -> image.ProgramImage:
    return image.ProgramImage(
        key="cd" * 32,
        maps=(image.MapSpec("cfg", 2, 4, 32, 1), image.MapSpec("nat", 9, 20, 20, 8)),
        programs={"p": LD_IMM64_MAP + LD_IMM64_MAP + EXIT},
        relocations={"p": ((0, 1), (2, 0))},
    )


def test_instructions_put_each_map_fd_in_its_slot() -> None:
    insns = _img().instructions("p", [41, 42])
    assert struct.unpack_from("<i", insns, 4)[0] == 42
    assert struct.unpack_from("<i", insns, 20)[0] == 41
    assert insns[32:] == EXIT


def test_json_round_trip() -> None:
    img = _img()
    assert image.ProgramImage.from_json(img.to_json()) == img
    assert img.version == 0xCDCDCDCD


def test_key_changes_with_the_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in image.SOURCES:
        (tmp_path / name).write_text((image.SOURCE_DIR / name).read_text())
    monkeypatch.setattr(image, "SOURCE_DIR", tmp_path)
    monkeypatch.setattr(image, "_keys", {})
    before = image.image_key()
    (tmp_path / "redirect.c").write_text((tmp_path / "redirect.c").read_text() + "\n")
    image._keys.clear()  # the key is computed once per process: a new process sees the edit
    assert image.image_key() != before


def test_cached_image_is_loaded_without_compiling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = image.image_key()
    cached = image.ProgramImage(key, _img().maps, _img().programs, _img().relocations)
    (tmp_path / f"redirect-{key[:16]}.json").write_text(cached.to_json())
    monkeypatch.setattr(image, "_loaded", {})

    def no_compile(_key: str) -> image.ProgramImage:
        raise AssertionError("compiled although a cached image exists")

    monkeypatch.setattr(image, "compile_image", no_compile)
    assert image.load_image(str(tmp_path)) == cached


def test_netlink_attributes_parse_nested_and_padded() -> None:
    raw = struct.pack("HH", 9, 7) + b"istio\0\0\0" + struct.pack("HHI", 8, 11, 99)
    attrs = parse_attrs(raw)
    assert attrs[7].rstrip(b"\0") == b"istio"
    assert struct.unpack("I", attrs[11])[0] == 99
