"""The C header's defaults, the ``-D`` flags and the Python struct formats all agree with
``cni_plugin.constants`` and with each other."""

from __future__ import annotations

import re
import struct

from cni_plugin import constants as c
from cni_plugin.bpf import image, pod, programs
from cni_plugin.redirection.settings import RedirectSettings

HEADER = (image.SOURCE_DIR / "redirect.h").read_text()


def _define(name: str) -> int:
    m = re.search(rf"#define {name} (0x[0-9a-fA-F]+|\d+)", HEADER)
    assert m, f"{name} not defined in redirect.h"
    return int(m.group(1), 0)


def test_header_defaults_equal_the_contract_constants() -> None:
    expected = {
        "ZTUNNEL_OUTBOUND_PORT": c.ZTUNNEL_OUTBOUND_PORT,
        "ZTUNNEL_INBOUND_PORT": c.ZTUNNEL_INBOUND_PORT,
        "ZTUNNEL_HBONE_PORT": c.ZTUNNEL_HBONE_PORT,
        "ZTUNNEL_DNS_PORT": c.ZTUNNEL_DNS_PORT,
        "DNS_PORT": c.DNS_PORT,
        "ZTUNNEL_MARK": c.ZTUNNEL_MARK,
        "CONNMARK": c.CONNMARK,
        "MARK_MASK": c.MARK_MASK,
    }
    for name, value in expected.items():
        assert _define(name) == value, name
        assert f"-D{name}={value}" in image.cflags()


def test_flag_bits_and_counter_names_match_the_header() -> None:
    assert _define("F_DNS_CAPTURE") == programs.F_DNS_CAPTURE
    assert _define("F_BYPASS_INBOUND") == programs.F_BYPASS_INBOUND
    assert _define("F_IPV6") == programs.F_IPV6
    assert _define("F_INBOUND_NAT") == programs.F_INBOUND_NAT
    assert _define("F_DRAIN") == programs.F_DRAIN
    names = ["C_OUTBOUND", "C_INBOUND", "C_DNS_TCP", "C_DNS_UDP", "C_REPLY", "C_NO_LISTENER",
             "C_LOCAL_REDIRECT", "C_VIRTUAL", "C_PORT_REMAP", "C_NO_PORT"]  # fmt: skip
    assert [_define(n) for n in names] == list(range(len(programs.COUNTER_NAMES)))


def test_struct_formats_have_the_c_sizes() -> None:
    # struct settings: 2 + 4 + 2 u32; nat_key: 16 + 2 + 1 + 1 + 16;
    # nat_val: 16 + 4 u16 + u64; nat_tuple: 16 + 16 + 2 u16 + 2 u8 + u16; nat_fwd_val: 2 u16.
    assert struct.calcsize(programs.SETTINGS_FORMAT) == 32
    assert struct.calcsize(programs.NAT_KEY_FORMAT) == 36
    assert struct.calcsize(programs.NAT_VAL_FORMAT) == 32
    assert struct.calcsize(programs.NAT_TUPLE_FORMAT) == 40
    assert struct.calcsize(programs.NAT_FWD_VAL_FORMAT) == 4
    assert struct.calcsize(programs.VIRT_ADDR_FORMAT) == 20  # struct virt_addr: 1 + 4 u32


def test_virt_value_packs_both_families_or_zero() -> None:
    raw = programs.virt_value("203.0.113.1", "2001:db8:8::1")
    assert (
        raw[:4] == bytes([203, 0, 113, 1]) and raw[4:].hex() == "20010db8000800000000000000000001"
    )
    assert programs.virt_value(None, None) == bytes(20)


def test_settings_value_encodes_flags_and_addresses() -> None:
    raw = programs.settings_value(RedirectSettings(dns_capture=False, bypass_inbound=True), 7)
    flags, probe4, probe6, version, _ = struct.unpack(programs.SETTINGS_FORMAT, raw)
    assert flags == programs.F_BYPASS_INBOUND | programs.F_IPV6
    assert struct.pack("<I", probe4) == bytes([169, 254, 7, 127])
    assert probe6.hex() == "fd16925471271337ffffffffffffffff"
    assert version == 7


def test_variant_names_differ_by_settings_and_avoid_dots() -> None:
    img = image.ProgramImage("ab" * 32, (), {}, {})
    a = programs.variant_name(img, RedirectSettings())
    b = programs.variant_name(img, RedirectSettings(bypass_inbound=True))
    assert a != b
    assert "." not in a + b, "bpffs refuses dots in names"


def test_pod_state_round_trips_and_rejects_foreign_maps() -> None:
    st = pod.PodState(0x1234, accept_local_orig=0, created_qdiscs=[1, 5])
    assert pod.PodState.unpack(st.pack()) == st
    assert pod.PodState.unpack(b"\0" * len(st.pack())) is None
