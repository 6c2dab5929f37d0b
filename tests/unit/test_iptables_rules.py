"""The rule model against Istio 1.24's golden files (loaded from ../shared/reference)."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from cni_plugin.constants import DNS_CAPTURE_ANNOTATION, VIRTUAL_INTERFACES_ANNOTATION
from cni_plugin.errors import RedirectionError
from cni_plugin.redirection.iptables_rules import (
    Family,
    Rule,
    inpod_rules,
    render_host_probe,
    render_inpod,
)
from cni_plugin.redirection.pod_overrides import pod_settings
from cni_plugin.redirection.settings import RedirectSettings

REFERENCE = Path(__file__).resolve().parents[2].parent / "shared" / "reference"
GOLDEN_DIR = REFERENCE / "istio-1.24" / "iptables"

# Istio's own golden test configuration uses this IPv6 probe address for the in-pod cases
# (its host-probe cases use the contract default). It is a test input, not a contract value.
ISTIO_TEST_PROBE_V6 = "e9ac:1e77:90ca:399f:4d6d:ece2:2f9b:3164"


def golden(name: str) -> str:
    path = GOLDEN_DIR / f"{name}.golden"
    # CI always has shared/ beside the clone: a missing oracle is a failure, never a skip.
    assert path.is_file(), f"golden file {path} is missing: shared/ must sit beside the repo"
    return path.read_text()


INPOD_CASES = {
    "default": RedirectSettings(dns_capture=True, ipv6=False),
    "default_ipv6": RedirectSettings(
        dns_capture=True, ipv6=True, probe_snat_ipv6=ISTIO_TEST_PROBE_V6
    ),
    "ingress": RedirectSettings(dns_capture=False, ipv6=False, bypass_inbound=True),
    "ingress_ipv6": RedirectSettings(
        dns_capture=False, ipv6=True, bypass_inbound=True, probe_snat_ipv6=ISTIO_TEST_PROBE_V6
    ),
}


@pytest.mark.parametrize("name", sorted(INPOD_CASES))
def test_inpod_rules_equal_istio_golden(name: str) -> None:
    assert render_inpod(INPOD_CASES[name]) == golden(name)


@pytest.mark.parametrize(("name", "ipv6"), [("hostprobe", False), ("hostprobe_ipv6", True)])
def test_host_probe_rule_equals_istio_golden(name: str, ipv6: bool) -> None:
    assert render_host_probe(RedirectSettings(ipv6=ipv6)) == golden(name)


# Newest Istio's goldens (istio-newest/iptables): its test config has DNS capture off
# unless the case names it, and the e9ac:... IPv6 probe address throughout.
NEWEST_DIR = REFERENCE / "istio-newest" / "iptables"
NEWEST_NODE = RedirectSettings(
    dns_capture=False, probe_snat_ipv6=ISTIO_TEST_PROBE_V6, ingress_connmark=True
)
VIRT_ANNOTATION = {VIRTUAL_INTERFACES_ANNOTATION: "fake1s0f0,fake1s0f1"}
# case -> (node settings, pod annotations); the pod's settings come from the same parser
# the agent uses (pod_overrides.pod_settings).
NEWEST_CASES: dict[str, tuple[RedirectSettings, dict[str, str]]] = {
    "default": (replace(NEWEST_NODE, dns_capture=True), {}),
    "virtual_interfaces": (NEWEST_NODE, VIRT_ANNOTATION),
    "ingress_and_virtual_interfaces": (replace(NEWEST_NODE, bypass_inbound=True), VIRT_ANNOTATION),
    "dns_pod_enabled_and_off_globally": (NEWEST_NODE, {DNS_CAPTURE_ANNOTATION: "true"}),
    "dns_pod_disabled_and_on_globally": (
        replace(NEWEST_NODE, dns_capture=True),
        {DNS_CAPTURE_ANNOTATION: "false"},
    ),
}


CONNMARK_SET = "-A ISTIO_PRERT -m mark --mark 0x539/0xfff -j CONNMARK --set-xmark 0x111/0xfff"


def newest_golden(name: str) -> str:
    """The restore input of a newest-Istio golden: its first two lines are the
    ``iptables-save`` / ``ip6tables-save`` commands Istio's dry run records."""
    path = NEWEST_DIR / f"{name}.golden"
    assert path.is_file(), f"golden file {path} is missing: shared/ must sit beside the repo"
    head, rest = path.read_text().split("\n", 2)[:2], path.read_text().split("\n", 2)[2]
    assert head == ["iptables-save", "ip6tables-save"], f"{path}: unexpected header {head}"
    return rest


def test_every_newest_golden_is_covered() -> None:
    names = {p.stem for p in NEWEST_DIR.glob("*.golden")}
    assert names == {n + sfx for n in NEWEST_CASES for sfx in ("", "_ipv6")}


@pytest.mark.parametrize("ipv6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("name", sorted(NEWEST_CASES))
def test_inpod_rules_equal_newest_istio_golden(name: str, ipv6: bool) -> None:
    node, annotations = NEWEST_CASES[name]
    settings = pod_settings(replace(node, ipv6=ipv6), annotations)
    assert render_inpod(settings) == newest_golden(name + ("_ipv6" if ipv6 else ""))


def test_newest_rules_differ_from_1_24_only_by_the_ingress_connmark() -> None:
    legacy = RedirectSettings(ipv6=False, bypass_inbound=True, dns_capture=False)
    newest = render_inpod(replace(legacy, ingress_connmark=True))
    assert newest != render_inpod(legacy) == golden("ingress")
    # The same lines plus that one rule (ISTIO_PRERT is declared first, holding it).
    assert sorted(newest.split("\n")) == sorted([*golden("ingress").split("\n"), CONNMARK_SET])
    # Outside the ingress variant the rule is there either way.
    assert render_inpod(replace(legacy, bypass_inbound=False, ingress_connmark=True)) == (
        render_inpod(replace(legacy, bypass_inbound=False))
    )


def test_virtual_interface_names_are_refused_before_any_rule() -> None:
    bad = RedirectSettings(virtual_interfaces=("eth0 -j DROP",))
    with pytest.raises(RedirectionError, match="reroute-virtual-interfaces"):
        render_inpod(bad)


def _without_dns(text: str) -> str:
    """Derive the DNS-off variant from a golden: drop the raw table and every 15053 rule."""
    text = re.sub(r"\* raw\n.*?COMMIT\n?", "", text, flags=re.S)
    return "\n".join(ln for ln in text.split("\n") if "15053" not in ln).rstrip("\n")


@pytest.mark.parametrize("ipv6", [False, True])
def test_dns_off_is_default_without_raw_table_and_dns_rules(ipv6: bool) -> None:
    name = "default_ipv6" if ipv6 else "default"
    on = INPOD_CASES[name]
    off = RedirectSettings(dns_capture=False, ipv6=ipv6, probe_snat_ipv6=on.probe_snat_ipv6)
    rendered = render_inpod(off)
    assert rendered == _without_dns(golden(name))
    assert "* raw" not in rendered and "15053" not in rendered


def test_ingress_with_dns_keeps_dns_capture_but_no_inbound_redirect() -> None:
    text = render_inpod(RedirectSettings(dns_capture=True, ipv6=False, bypass_inbound=True))
    assert "--to-ports 15006" not in text and "CONNMARK --set-xmark" not in text
    assert "--to-port 15053" in text and "* raw" in text


def test_settings_flow_into_rules() -> None:
    s = RedirectSettings(ipv6=False, outbound_port=16001, probe_snat_ipv4="169.254.9.9")
    text = render_inpod(s)
    assert "--to-ports 16001" in text and "-s 169.254.9.9 " in text
    assert "15001" not in text


def test_save_form_matches_what_the_kernel_prints() -> None:
    # The transformations the kernel round trip applies (checked for real in the netns tests).
    r = Rule("nat", "ISTIO_OUTPUT", ("!", "-d", "::1/128", "-p", "tcp", "--dport", "53",
                                     "-j", "REDIRECT", "--to-port", "15053"))  # fmt: skip
    assert r.save_line(Family.IPV6) == (
        "-A ISTIO_OUTPUT ! -d ::1/128 -p tcp -m tcp --dport 53 -j REDIRECT --to-ports 15053"
    )
    r = Rule(
        "nat", "ISTIO_PRERT", ("-s", "169.254.7.127", "-p", "tcp", "-m", "tcp", "-j", "ACCEPT")
    )
    assert r.save_line(Family.IPV4) == "-A ISTIO_PRERT -s 169.254.7.127/32 -p tcp -m tcp -j ACCEPT"


def test_chain_declaration_order_follows_first_use() -> None:
    rs = inpod_rules(RedirectSettings(bypass_inbound=True, dns_capture=False), Family.IPV4)
    # ISTIO_PRERT holds no rule in the ingress variant: declared after ISTIO_OUTPUT.
    assert rs.chains("nat") == ["ISTIO_OUTPUT", "ISTIO_PRERT"]
    assert rs.tables() == ["mangle", "nat"]


def test_save_form_puts_the_protocol_before_matches() -> None:
    from cni_plugin.redirection.iptables_rules import host_probe_rules

    rule = host_probe_rules(RedirectSettings(), Family.IPV4).rules[-1]
    # As iptables-nft-save prints the hostprobe golden rule once installed.
    assert rule.save_line(Family.IPV4) == (
        "-A ISTIO_POSTRT -p tcp -m owner --socket-exists -m set --match-set "
        "istio-inpod-probes-v4 dst -j SNAT --to-source 169.254.7.127"
    )
