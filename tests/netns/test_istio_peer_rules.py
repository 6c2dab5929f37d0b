"""Istio's own agent code (built from the module proxy by ``bench.istio_peer``) and ours,
each installing a pod's rules into a fresh namespace on the real kernel: the kernel must hold
the same chains, rules, policy rule and route either way (so the side-by-side benchmark
compares equal work), and Istio's removal must leave nothing of it behind.

The first run builds Istio's binaries into the shared cache (minutes, progress printed)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.istio_peer import DRIVER, PeerBuildError, ensure_peer
from bench.vs_istio_rules import IstioRuleDriver
from cni_plugin.redirection.iptables_state import parse_save
from cni_plugin.redirection.registry import make_backend
from cni_plugin.redirection.settings import RedirectSettings

pytestmark = pytest.mark.netns
# Istio's binaries are built before the first test (tests/conftest.py), outside timeouts.
NEEDS_ISTIO_PEER = True


@pytest.fixture(scope="module")
def driver_exe() -> Path:
    try:
        return ensure_peer().path(DRIVER)
    except PeerBuildError as e:
        pytest.fail(f"Istio's binaries could not be built: {e}")


@pytest.fixture
def istio(
    driver_exe: Path,
    tmp_path: Path,
    make_netns: Callable[[str], str],
    request: pytest.FixtureRequest,
) -> Iterator[IstioRuleDriver]:
    nft = bool(getattr(request, "param", False))
    node = f"/run/netns/{make_netns('node')}"  # Istio probes the "host" xtables here
    log = tmp_path / "istio.log"
    d = IstioRuleDriver(driver_exe, node_netns=node, ipv6=True, nftables=nft, log=log)
    yield d
    d.close()


def _out(ns: str, *argv: str) -> str:
    cmd = ["ip", "netns", "exec", ns, *argv]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def _xtables(ns: str) -> dict[str, object]:
    """Per family: the non-built-in chains and every rule, by table (empty tables left out:
    emptying a chain leaves its table behind in the nft variant)."""
    state: dict[str, object] = {}
    for cmd in ("iptables-save", "ip6tables-save"):
        saved = parse_save(_out(ns, cmd))
        own = {t: sorted(c for c in cs if c.startswith("ISTIO")) for t, cs in saved.chains.items()}
        state[cmd] = (
            {t: cs for t, cs in own.items() if cs},
            {t: r for t, r in saved.rules.items() if r},
        )
    return state


def _routing(ns: str) -> list[str]:
    return [
        _out(ns, "ip", "-4", "rule"),
        _out(ns, "ip", "-6", "rule"),
        _out(ns, "ip", "-d", "-4", "route", "show", "table", "all"),
        _out(ns, "ip", "-d", "-6", "route", "show", "table", "all"),
    ]


def test_istio_and_ours_leave_the_same_iptables_state(
    make_netns: Callable[[str], str], istio: IstioRuleDriver
) -> None:
    theirs, ours = make_netns("istio"), make_netns("ours")
    istio.add(f"/run/netns/{theirs}")
    make_backend("iptables").apply(f"/run/netns/{ours}", RedirectSettings())
    got = _xtables(theirs)
    assert "ISTIO_OUTPUT" in str(got["iptables-save"]), "Istio's driver installed nothing"
    assert got == _xtables(ours)
    assert _routing(theirs) == _routing(ours)


@pytest.mark.parametrize("istio", [True], indirect=True, ids=["nftables"])
def test_istio_and_ours_leave_the_same_nftables_ruleset(
    make_netns: Callable[[str], str], istio: IstioRuleDriver
) -> None:
    theirs, ours = make_netns("istio"), make_netns("ours")
    istio.add(f"/run/netns/{theirs}")
    make_backend("nftables").apply(f"/run/netns/{ours}", RedirectSettings())
    got = _out(theirs, "nft", "list", "ruleset")
    assert "istio-ambient" in got, "Istio's driver installed no nftables tables"
    assert got == _out(ours, "nft", "list", "ruleset")
    assert _routing(theirs) == _routing(ours)


def test_istio_removal_restores_the_fresh_namespace(
    make_netns: Callable[[str], str], istio: IstioRuleDriver
) -> None:
    ns = make_netns("istio")
    fresh = (_xtables(ns), _routing(ns))
    istio.add(f"/run/netns/{ns}")
    assert (_xtables(ns), _routing(ns)) != fresh
    istio.remove(f"/run/netns/{ns}")
    assert (_xtables(ns), _routing(ns)) == fresh


def test_istio_driver_reports_a_missing_namespace(istio: IstioRuleDriver) -> None:
    with pytest.raises(RuntimeError, match="/run/netns/icnit-does-not-exist"):
        istio.add("/run/netns/icnit-does-not-exist")
