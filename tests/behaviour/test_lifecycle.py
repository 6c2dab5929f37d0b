"""Lifecycle cases of the behaviour table (9, 10): remove restores everything, apply is
idempotent, check notices tampering, and bad namespace paths fail clearly, changing nothing."""

from __future__ import annotations

import os
import tempfile

import pytest

from cni_plugin.errors import IstioCniError
from cni_plugin.redirection.settings import RedirectSettings
from tests.behaviour.backends import BackendCase
from tests.behaviour.cases import DEFAULT, DNS_OFF, INGRESS, VIRTUAL
from tests.behaviour.topology import Topology, read_state, snapshot

pytestmark = pytest.mark.netns

SETTINGS = {"default": DEFAULT, "dns-off": DNS_OFF, "ingress": INGRESS,
            "ipv4-only": {**DEFAULT, "ipv6": False}, "virtual": VIRTUAL}  # fmt: skip


def _diff(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return [f"{k}:\n--- before\n{before[k]}\n--- after\n{after[k]}" for k in before
            if before[k] != after[k]]  # fmt: skip


@pytest.mark.parametrize("variant", sorted(SETTINGS))
def test_remove_restores_state_exactly(
    backend_case: BackendCase, topology: Topology, variant: str
) -> None:
    settings = RedirectSettings(**SETTINGS[variant])
    if settings.virtual_interfaces:
        topology.add_vm()
    backend = backend_case.build()
    before = snapshot(topology.pod_path)
    backend.apply(topology.pod_path, settings)
    applied = snapshot(topology.pod_path)
    assert applied != before, "apply changed nothing visible"
    backend.remove(topology.pod_path, settings)
    assert not _diff(before, snapshot(topology.pod_path)), "\n".join(
        _diff(before, snapshot(topology.pod_path))
    )
    # Removing what is absent is fine and still changes nothing.
    backend.remove(topology.pod_path, settings)
    assert not _diff(before, snapshot(topology.pod_path))


def test_apply_twice_equals_apply_once(backend_case: BackendCase, topology: Topology) -> None:
    settings = RedirectSettings(**DEFAULT)
    backend = backend_case.build()
    backend.apply(topology.pod_path, settings)
    once = snapshot(topology.pod_path)
    backend.apply(topology.pod_path, settings)
    assert not _diff(once, snapshot(topology.pod_path))
    assert backend.check(topology.pod_path, settings).ok


def test_apply_with_other_settings_converges(backend_case: BackendCase, topology: Topology) -> None:
    backend = backend_case.build()
    backend.apply(topology.pod_path, RedirectSettings(**DEFAULT))
    ingress = RedirectSettings(**INGRESS)
    assert not backend.check(topology.pod_path, ingress).ok
    backend.apply(topology.pod_path, ingress)
    assert backend.check(topology.pod_path, ingress).ok


def test_virtual_interfaces_come_and_go_with_the_pod_setting(
    backend_case: BackendCase, topology: Topology
) -> None:
    topology.add_vm()
    backend = backend_case.build()
    before = snapshot(topology.pod_path)
    plain, virtual = RedirectSettings(**DEFAULT), RedirectSettings(**VIRTUAL)
    backend.apply(topology.pod_path, plain)
    assert not backend.check(topology.pod_path, virtual).ok
    backend.apply(topology.pod_path, virtual)
    assert backend.check(topology.pod_path, virtual).ok
    assert not backend.check(topology.pod_path, plain).ok
    backend.apply(topology.pod_path, plain)
    assert backend.check(topology.pod_path, plain).ok
    backend.remove(topology.pod_path, plain)
    assert not _diff(before, snapshot(topology.pod_path))


def test_check_detects_tampering_and_apply_repairs(
    backend_case: BackendCase, topology: Topology
) -> None:
    assert backend_case.tampers, f"backend {backend_case.id} declares no tampers to check"
    settings = RedirectSettings(**DEFAULT)
    backend = backend_case.build()
    for name, tamper in backend_case.tampers:
        backend.apply(topology.pod_path, settings)
        assert backend.check(topology.pod_path, settings).ok
        what = tamper(backend, topology.pod_ns)
        report = backend.check(topology.pod_path, settings)
        assert not report.ok and report.missing, f"check missed tamper {name}: {what}"
        backend.apply(topology.pod_path, settings)
        assert backend.check(topology.pod_path, settings).ok, f"apply did not repair {name}"


def _bad_paths() -> dict[str, str]:
    return {"missing": "/run/netns/icnit-does-not-exist", "host": "/proc/self/ns/net"}


@pytest.mark.parametrize("kind", ["missing", "regular-file", "host"])
def test_apply_on_bad_path_fails_clearly_and_changes_nothing(
    backend_case: BackendCase, topology: Topology, kind: str
) -> None:
    backend = backend_case.build()
    settings = RedirectSettings(**DEFAULT)
    host_before = _host_rules()
    with tempfile.NamedTemporaryFile(prefix="icnit-") as regular:
        path = regular.name if kind == "regular-file" else _bad_paths()[kind]
        expect = {"missing": "does not exist", "regular-file": "not a network namespace",
                  "host": "host's own network namespace"}[kind]  # fmt: skip
        pod_before = snapshot(topology.pod_path)
        with pytest.raises(IstioCniError, match=expect):
            backend.apply(path, settings)
        with pytest.raises(IstioCniError, match=expect):
            backend.check(path, settings)
        assert os.path.getsize(regular.name) == 0
    assert not os.path.exists(_bad_paths()["missing"]), "a missing namespace was created"
    assert snapshot(topology.pod_path) == pod_before
    assert _host_rules() == host_before


def _host_rules() -> dict[str, str]:
    """The host's rules, read in place (never entered): xtables, nftables, policy rules.
    Routes are left out: other work on this machine may add links at any time."""
    state = read_state()
    return {k: v for k, v in state.items() if "route" not in k}
