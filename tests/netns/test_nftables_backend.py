"""NftablesBackend on the real kernel: apply/check/remove in throwaway namespaces.

What is shown: the kernel holds exactly what ``nft -f <golden>`` gives; apply twice ==
once; check finds missing and extra items; remove restores the namespace byte for byte
(foreign tables and rules untouched); a failed apply changes nothing.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from cni_plugin.errors import RedirectionError
from cni_plugin.redirection import policy_routes
from cni_plugin.redirection.nftables_backend import NftablesBackend
from cni_plugin.redirection.settings import RedirectSettings

pytestmark = pytest.mark.netns

GOLDEN_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "reference" / "istio-1.28"
GOLDEN_DIR = GOLDEN_DIR / "nftables"
ISTIO_TEST = RedirectSettings(
    probe_snat_ipv4="169.254.7.127", probe_snat_ipv6="e9ac:1e77:90ca:399f:4d6d:ece2:2f9b:3164"
)
VIRTUAL = ("fake1s0f0", "fake1s0f1")
DNS_OFF = replace(ISTIO_TEST, dns_capture=False)
# golden name -> settings (IPv6 from the name)
VARIANTS: dict[str, RedirectSettings] = {
    "default": ISTIO_TEST,
    "default_ipv6": ISTIO_TEST,
    "ingress": replace(DNS_OFF, bypass_inbound=True),
    "ingress_ipv6": replace(DNS_OFF, bypass_inbound=True),
    "dns_pod_disabled_and_on_globally": DNS_OFF,
    "dns_pod_enabled_and_off_globally_ipv6": ISTIO_TEST,
    "virtual_interfaces_ipv6": replace(DNS_OFF, virtual_interfaces=VIRTUAL),
    "ingress_and_virtual_interfaces": replace(
        DNS_OFF, bypass_inbound=True, virtual_interfaces=VIRTUAL
    ),
}


def _settings(name: str) -> RedirectSettings:
    return replace(VARIANTS[name], ipv6=name.endswith("_ipv6"))


def sh(*argv: str, check: bool = True) -> str:
    return subprocess.run(argv, check=check, capture_output=True, text=True).stdout


def nft_state(ns: str) -> str:
    return sh("ip", "netns", "exec", ns, "nft", "-s", "list", "ruleset")


def route_state(ns: str) -> str:
    return "".join(
        sh("ip", "-n", ns, *fam, *what)
        for fam in (["-4"], ["-6"])
        for what in (["rule"], ["route", "show", "table", "all"])
    )


def state(ns: str) -> str:
    return nft_state(ns) + route_state(ns)


@pytest.mark.parametrize("golden", sorted(VARIANTS))
def test_kernel_holds_what_the_golden_gives_and_apply_is_idempotent(
    make_netns: Callable[[str], str], golden: str
) -> None:
    settings = _settings(golden)
    ours, ref = make_netns("nft"), make_netns("ref")
    path = GOLDEN_DIR / f"{golden}.golden"
    assert path.is_file(), f"golden {path} missing"
    sh("ip", "netns", "exec", ref, "nft", "-f", str(path))

    backend = NftablesBackend()
    backend.apply(f"/run/netns/{ours}", settings)
    assert nft_state(ours) == nft_state(ref)
    report = backend.check(f"/run/netns/{ours}", settings)
    assert report.ok, report

    first = state(ours)
    assert "lookup 100" in first and "fwmark 0x111/0xfff" in first
    backend.apply(f"/run/netns/{ours}", settings)
    assert state(ours) == first
    assert backend.check(f"/run/netns/{ours}", settings).ok


def test_remove_restores_the_namespace_and_leaves_foreign_objects(
    make_netns: Callable[[str], str],
) -> None:
    ns = make_netns("rm")
    path = f"/run/netns/{ns}"
    sh(
        "ip",
        "netns",
        "exec",
        ns,
        "nft",
        "add table inet keepme; add chain inet keepme c; "
        "add rule inet keepme c tcp dport 9 counter accept",
    )
    sh("ip", "-n", ns, "rule", "add", "fwmark", "0x222", "lookup", "200", "pref", "1000")
    before = state(ns)
    backend = NftablesBackend()
    settings = RedirectSettings()
    backend.apply(path, settings)
    assert state(ns) != before
    backend.remove(path, settings)
    assert state(ns) == before
    backend.remove(path, settings)  # absent is not an error
    assert state(ns) == before
    report = backend.check(path, settings)
    assert "table inet istio-ambient-nat" in report.missing and not report.extra


def test_check_reports_missing_and_extra(make_netns: Callable[[str], str]) -> None:
    ns = make_netns("chk")
    path = f"/run/netns/{ns}"
    backend = NftablesBackend()
    settings = RedirectSettings(ipv6=False)
    backend.apply(path, settings)

    listing = sh(
        "ip",
        "netns",
        "exec",
        ns,
        "nft",
        "-a",
        "list",
        "chain",
        "inet",
        "istio-ambient-nat",
        "istio-output",
    )
    victim = next(ln for ln in listing.splitlines() if "redirect to :15001" in ln)
    handle = victim.rsplit("# handle", 1)[1].strip()
    sh(
        "ip",
        "netns",
        "exec",
        ns,
        "nft",
        "delete",
        "rule",
        "inet",
        "istio-ambient-nat",
        "istio-output",
        "handle",
        handle,
    )
    sh(
        "ip",
        "netns",
        "exec",
        ns,
        "nft",
        "add",
        "rule",
        "inet",
        "istio-ambient-mangle",
        "istio-output",
        "tcp",
        "dport",
        "7",
        "drop",
    )
    sh("ip", "-n", ns, "rule", "del", "fwmark", "0x111/0xfff", "lookup", "100")

    report = backend.check(path, settings)
    assert not report.ok
    assert any("istio-output" in m and "redirect to :15001" in m for m in report.missing)
    assert any("ip rule fwmark 0x111/0xfff" in m for m in report.missing)
    assert any("istio-ambient-mangle" in e and "tcp dport 7 drop" in e for e in report.extra)
    assert len(report.missing) == 2 and len(report.extra) == 1

    backend.apply(path, settings)  # repairs
    assert backend.check(path, settings).ok


def test_switching_settings_converges(make_netns: Callable[[str], str]) -> None:
    ns = make_netns("sw")
    path = f"/run/netns/{ns}"
    backend = NftablesBackend()
    on, off = RedirectSettings(dns_capture=True), RedirectSettings(dns_capture=False)
    backend.apply(path, on)
    report = backend.check(path, off)
    assert "table inet istio-ambient-raw" in report.extra
    backend.apply(path, off)
    assert "istio-ambient-raw" not in nft_state(ns)
    assert ":15053" not in nft_state(ns)
    assert backend.check(path, off).ok


def test_failed_apply_changes_nothing(make_netns: Callable[[str], str]) -> None:
    ns = make_netns("fail")
    path = f"/run/netns/{ns}"
    # A foreign base chain of another type where ours must go: nft refuses the batch.
    sh(
        "ip",
        "netns",
        "exec",
        ns,
        "nft",
        "add table inet istio-ambient-mangle; add chain "
        "inet istio-ambient-mangle output { type filter hook output priority 0 ; }",
    )
    before = state(ns)
    with pytest.raises(RedirectionError, match="nothing was changed"):
        NftablesBackend().apply(path, RedirectSettings())
    assert state(ns) == before


class _FailingRoutes:
    """The real policy routes, except that install fails (the kernel will not fail on
    demand here): shows apply puts our tables back as they were."""

    def describe_all(self, settings: RedirectSettings) -> list[str]:
        return policy_routes.describe_all(settings)

    def install(self, settings: RedirectSettings) -> None:
        raise RedirectionError("injected route failure")

    def uninstall(self, settings: RedirectSettings) -> None:
        policy_routes.uninstall(settings)

    def check(self, settings: RedirectSettings) -> tuple[list[str], list[str]]:
        return policy_routes.check(settings)


@pytest.mark.parametrize("prior", [None, RedirectSettings(dns_capture=False)], ids=["fresh", "re"])
def test_route_failure_restores_previous_tables(
    make_netns: Callable[[str], str], prior: RedirectSettings | None
) -> None:
    ns = make_netns("rb")
    path = f"/run/netns/{ns}"
    if prior is not None:
        NftablesBackend().apply(path, prior)
    before = state(ns)
    with pytest.raises(RedirectionError, match="injected"):
        NftablesBackend(routes=_FailingRoutes()).apply(path, RedirectSettings(dns_capture=True))
    assert state(ns) == before


def test_render_is_nft_input_with_routes_as_comments(make_netns: Callable[[str], str]) -> None:
    ns = make_netns("render")
    text = NftablesBackend().render(RedirectSettings())
    assert "# ip rule fwmark 0x111/0xfff lookup 100 pref 32764" in text
    # Comments and all, the render is accepted by nft as is.
    subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=text, text=True, check=True)
    assert "istio-ambient-raw" in nft_state(ns)


def test_host_namespace_is_refused() -> None:
    from cni_plugin.errors import NetnsError

    with pytest.raises(NetnsError):
        NftablesBackend().apply("/proc/self/ns/net", RedirectSettings())
