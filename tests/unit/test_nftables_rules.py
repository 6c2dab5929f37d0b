"""The nftables rule model renders Istio's goldens byte for byte (reference/istio-1.28)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from cni_plugin.constants import DNS_CAPTURE_ANNOTATION as DNS_ANN
from cni_plugin.constants import VIRTUAL_INTERFACES_ANNOTATION as VIRT_ANN
from cni_plugin.errors import RedirectionError
from cni_plugin.redirection import nftables_rules as m
from cni_plugin.redirection.pod_overrides import pod_settings
from cni_plugin.redirection.settings import RedirectSettings

REFERENCE = Path(__file__).resolve().parents[2] / ".." / "shared" / "reference"
GOLDEN_DIR = REFERENCE / "istio-1.28" / "nftables"

# Istio's test config: probe SNAT addresses of its constructTestConfig().
BASE = RedirectSettings(
    probe_snat_ipv4="169.254.7.127",
    probe_snat_ipv6="e9ac:1e77:90ca:399f:4d6d:ece2:2f9b:3164",
)
VIRTUAL = ("fake1s0f0", "fake1s0f1")
DNS_OFF = replace(BASE, dns_capture=False)

# case -> settings without ipv6 applied. Istio's cases: `default` has DNS on; the others
# have global DNS off. The dns_pod_* cases go through the pod-annotation parser over the
# node setting they name, as the agent does.
INPOD_CASES: dict[str, RedirectSettings] = {
    "default": replace(BASE, dns_capture=True),
    "ingress": replace(DNS_OFF, bypass_inbound=True),
    "virtual_interfaces": pod_settings(DNS_OFF, {VIRT_ANN: "fake1s0f0,fake1s0f1"}),
    "ingress_and_virtual_interfaces": replace(
        DNS_OFF, bypass_inbound=True, virtual_interfaces=VIRTUAL
    ),
    "dns_pod_enabled_and_off_globally": pod_settings(DNS_OFF, {DNS_ANN: "true"}),
    "dns_pod_disabled_and_on_globally": pod_settings(
        replace(BASE, dns_capture=True), {DNS_ANN: "false"}
    ),
}


def golden(name: str) -> str:
    path = GOLDEN_DIR / f"{name}.golden"
    if not path.is_file():
        pytest.fail(f"golden file {path} is missing: the shared reference data must be present")
    return path.read_text()


def test_every_golden_is_covered() -> None:
    if not GOLDEN_DIR.is_dir():
        pytest.fail(f"reference directory {GOLDEN_DIR} is missing")
    names = {p.stem for p in GOLDEN_DIR.glob("*.golden")}
    covered = {n + sfx for n in [*INPOD_CASES, "hostprobe"] for sfx in ("", "_ipv6")}
    assert names == covered


@pytest.mark.parametrize("ipv6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("case", sorted(INPOD_CASES))
def test_inpod_text_equals_golden(case: str, ipv6: bool) -> None:
    text = m.inpod_ruleset(replace(INPOD_CASES[case], ipv6=ipv6)).text()
    assert text == golden(case + ("_ipv6" if ipv6 else ""))


@pytest.mark.parametrize("ipv6", [False, True], ids=["ipv4", "ipv6"])
def test_hostprobe_text_equals_golden(ipv6: bool) -> None:
    text = m.host_probe_ruleset(replace(BASE, ipv6=ipv6), kubelet_uid=1000).text()
    assert text == golden("hostprobe" + ("_ipv6" if ipv6 else ""))


def test_raw_table_only_with_dns_capture() -> None:
    on = m.inpod_ruleset(replace(BASE, dns_capture=True))
    off = m.inpod_ruleset(replace(BASE, dns_capture=False))
    assert on.table_names == (m.NAT_TABLE, m.MANGLE_TABLE, m.RAW_TABLE)
    assert off.table_names == (m.NAT_TABLE, m.MANGLE_TABLE)
    assert ":15053" not in off.text()


def test_ports_and_marks_come_from_settings() -> None:
    s = replace(BASE, outbound_port=25001, inbound_port=25006, ztunnel_mark=0x123, connmark=0x77)
    text = m.inpod_ruleset(s).text()
    assert "redirect to :25001" in text and "redirect to :25006" in text
    assert "!= 0x123" in text and "== 0x77" in text
    assert ":15001" not in text and "0x539" not in text


@pytest.mark.parametrize("bad", ["", "a b", 'x"y', "eth0;flush", "x" * 16])
def test_virtual_interface_names_are_validated(bad: str) -> None:
    with pytest.raises(RedirectionError, match=r"invalid virtual interface.*reroute-virtual"):
        m.inpod_ruleset(replace(BASE, virtual_interfaces=(bad,)))


def test_host_sets_text_declares_the_sets_the_rule_uses() -> None:
    rules = m.host_probe_ruleset(BASE, kubelet_uid=0).text()
    sets = m.host_probe_sets_text(ipv6=True)
    for name in ("istio-inpod-probes-v4", "istio-inpod-probes-v6"):
        assert f"@{name}" in rules
        assert f"add set inet istio-ambient-nat {name} {{" in sets
    assert "istio-inpod-probes-v6" not in m.host_probe_sets_text(ipv6=False)
