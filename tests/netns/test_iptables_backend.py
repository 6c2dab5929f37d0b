"""The iptables backend on the real kernel: what lands in xtables is exactly the model's
save form (both appliers, every variant), and a failing install leaves nothing behind."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import pytest

from cni_plugin.errors import RedirectionError
from cni_plugin.redirection.iptables_backend import IptablesBackend
from cni_plugin.redirection.iptables_rules import Family, families, inpod_rules
from cni_plugin.redirection.iptables_state import parse_save
from cni_plugin.redirection.settings import RedirectSettings

pytestmark = pytest.mark.netns

APPLIERS = ["iptables-restore", "python-iptables"]
VARIANTS = {
    "default": RedirectSettings(),
    "ingress": RedirectSettings(bypass_inbound=True),
    "dns-off": RedirectSettings(dns_capture=False),
    "ipv4-only": RedirectSettings(ipv6=False),
    # Newest Istio's per-pod fields: interfaces need not exist for `-i` to match later.
    "virtual-interfaces": RedirectSettings(virtual_interfaces=("fake1s0f0", "fake1s0f1")),
    "ingress-virtual-newest": RedirectSettings(
        bypass_inbound=True, virtual_interfaces=("k6t-eth0",), ingress_connmark=True
    ),
}


def _save(ns: str, variant: str, family: Family) -> str:
    cmd = ["ip", "netns", "exec", ns, f"{family.command}-{variant}-save"]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("applier", APPLIERS)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_kernel_holds_exactly_the_model_save_form(
    make_netns: Callable[[str], str], applier: str, variant: str
) -> None:
    ns = make_netns("ipt")
    settings = VARIANTS[variant]
    backend = IptablesBackend(applier)
    backend.apply(f"/run/netns/{ns}", settings)
    for fam in families(settings):
        saved = parse_save(_save(ns, backend.applier.variant, fam))
        rs = inpod_rules(settings, fam)
        for table in rs.tables():
            for chain in {r.chain for r in rs.rules_of(table)}:
                want = [r.save_line(fam) for r in rs.rules_of(table) if r.chain == chain]
                assert saved.rules[table][chain] == want
    assert backend.check(f"/run/netns/{ns}", settings).ok


@pytest.mark.parametrize("applier", APPLIERS)
def test_failed_install_leaves_nothing(make_netns: Callable[[str], str], applier: str) -> None:
    ns = make_netns("ipt")
    path = f"/run/netns/{ns}"
    backend = IptablesBackend(applier)
    # IPv4 installs, then the kernel rejects the IPv6 probe address: everything is undone.
    bad = RedirectSettings(probe_snat_ipv6="not-an-address")
    with pytest.raises(RedirectionError):
        backend.apply(path, bad)
    for fam in Family:
        assert not parse_save(_save(ns, backend.applier.variant, fam)).holds_ours()
    rules = subprocess.run(["ip", "-n", ns, "rule"], capture_output=True, text=True).stdout
    assert "lookup 100" not in rules


def test_reply_path_needs_the_policy_route(make_netns: Callable[[str], str]) -> None:
    """Negative control for behaviour case 7: without the fwmark rule the app's reply to a
    spoofed-source connection leaves on the veth, and ztunnel's connect fails."""
    from tests.behaviour.topology import APP_PORT, build

    topo = build(make_netns)
    try:
        IptablesBackend().apply(topo.pod_path, RedirectSettings())
        subprocess.run(["ip", "-n", topo.pod_ns, "rule", "del", "pref", "32764"], check=True)
        pod, peer = topo.address("pod", "ipv4"), topo.address("peer", "ipv4")
        with pytest.raises(OSError):
            topo.ztunnel_connect("ipv4", (pod, APP_PORT), spoof_source=peer)
    finally:
        topo.close()


@pytest.mark.parametrize("applier", APPLIERS)
def test_failed_routes_undo_the_installed_rules(
    make_netns: Callable[[str], str], applier: str
) -> None:
    ns = make_netns("ipt")
    backend = IptablesBackend(applier)
    # Rules install for both families, then the kernel refuses a rule into table 0.
    with pytest.raises(RedirectionError, match="policy routing"):
        backend.apply(f"/run/netns/{ns}", RedirectSettings(route_table=0))
    for fam in Family:
        assert not parse_save(_save(ns, backend.applier.variant, fam)).holds_ours()
    for v in ("-4", "-6"):
        rules = subprocess.run(["ip", v, "-n", ns, "rule"], capture_output=True, text=True)
        assert "fwmark" not in rules.stdout


@pytest.mark.parametrize("applier", APPLIERS)
def test_host_probe_rule_installs_checks_and_removes(
    make_netns: Callable[[str], str], applier: str
) -> None:
    """The node-side rule through the same appliers (a namespace stands in for the node)."""
    from cni_plugin.netns import run_in_netns
    from cni_plugin.redirection.iptables_backend import make_applier
    from cni_plugin.redirection.iptables_rules import HOST_CHAINS, host_probe_rules
    from cni_plugin.redirection.iptables_state import diff

    ns = make_netns("node")
    for fam, name in (
        (Family.IPV4, "istio-inpod-probes-v4"),
        (Family.IPV6, "istio-inpod-probes-v6"),
    ):
        kind = ["family", "inet6"] if fam is Family.IPV6 else []
        subprocess.run(["ip", "netns", "exec", ns, "ipset", "create", name, "hash:ip", *kind],
                       check=True)  # fmt: skip
    impl = make_applier(applier)

    def work() -> list[tuple[list[str], list[str]]]:
        out = []
        for fam in Family:
            rs = host_probe_rules(RedirectSettings(), fam)
            impl.install(rs)
            out.append(diff(rs, parse_save(impl.save(fam), own=HOST_CHAINS)))
            impl.uninstall(fam, parse_save(impl.save(fam), own=HOST_CHAINS))
            assert not parse_save(impl.save(fam), own=HOST_CHAINS).holds_ours()
        return out

    assert run_in_netns(f"/run/netns/{ns}", work) == [([], []), ([], [])]


@pytest.mark.parametrize("variant", ["nft", "legacy"])
def test_save_skipped_only_when_the_namespace_has_no_tables(
    make_netns: Callable[[str], str], variant: str
) -> None:
    """``save_all`` answers an empty save without a process only when there really is no
    table of the family: after an IPv4-only apply the IPv4 save is real, the IPv6 one empty."""
    from cni_plugin.netns import run_in_netns
    from cni_plugin.redirection.iptables_restore import IptablesRestoreApplier, _holds_no_tables

    ns = make_netns("ipt")
    path = f"/run/netns/{ns}"
    both = [Family.IPV4, Family.IPV6]
    assert run_in_netns(path, lambda: _holds_no_tables(variant, both)) == [True, True]
    backend = IptablesBackend(IptablesRestoreApplier(variant))
    backend.apply(path, RedirectSettings(ipv6=False))
    assert run_in_netns(path, lambda: _holds_no_tables(variant, both)) == [False, True]
    texts = run_in_netns(path, lambda: backend.applier.save_all(both))
    # Parsed: the save's header comments carry a timestamp.
    assert parse_save(texts[0]) == parse_save(_save(ns, variant, Family.IPV4))
    assert _save(ns, variant, Family.IPV6) == ""
    assert parse_save(texts[0]).holds_ours() and texts[1] == ""
    assert backend.check(path, RedirectSettings(ipv6=False)).ok
