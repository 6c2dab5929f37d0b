"""``istio-cni-agent redirect``: rendering and usage errors (no privileges needed)."""

from __future__ import annotations

import pytest

from node_agent.cli import main
from tests.unit.test_iptables_rules import golden


def test_render_prints_the_golden_rules_then_the_routes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["redirect", "render", "--no-ipv6", "--dns-capture"]) == 0
    out = capsys.readouterr().out
    rules, _, routes = out.partition("\n# policy routing")
    assert rules == golden("default")
    assert "# ip rule fwmark 0x111/0xfff lookup 100 pref 32764" in routes
    assert "# ip route local 0.0.0.0/0 dev lo table 100" in routes


def test_render_ingress_variant(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["redirect", "render", "--no-ipv6", "--no-dns-capture", "--bypass-inbound"]) == 0
    assert capsys.readouterr().out.partition("\n# policy routing")[0] == golden("ingress")


def test_dns_capture_defaults_to_the_agent_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AMBIENT_DNS_CAPTURE", raising=False)
    assert main(["redirect", "render"]) == 0
    assert "15053" not in capsys.readouterr().out  # off by default, as in Istio 1.24
    monkeypatch.setenv("AMBIENT_DNS_CAPTURE", "true")
    assert main(["redirect", "render"]) == 0
    assert "15053" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["redirect", "apply"], "apply needs --netns PATH"),
        (
            ["redirect", "check", "--backend", "nftables", "--applier", "python-iptables"],
            "--applier only applies to --backend iptables",
        ),
    ],
)
def test_usage_errors_are_one_clear_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_bad_environment_boolean_is_reported(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AMBIENT_IPV6", "maybe")
    assert main(["redirect", "render"]) == 1
    assert "AMBIENT_IPV6='maybe' is not a boolean" in capsys.readouterr().err


def test_ebpf_uses_the_agents_pin_root(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``redirect --backend ebpf`` looks where the running agent pins (its env names)."""
    monkeypatch.delenv("AMBIENT_EBPF_PIN_ROOT", raising=False)
    assert main(["redirect", "render", "--backend", "ebpf"]) == 0
    assert "/sys/fs/bpf/istio-cni/pods/<netns inode>" in capsys.readouterr().out
    monkeypatch.setenv("AMBIENT_EBPF_PIN_ROOT", "/sys/fs/bpf/istio-cni-x")
    monkeypatch.setenv("HOST_CGROUP2_ROOT", "/host/sys/fs/cgroup")
    assert main(["redirect", "render", "--backend", "ebpf"]) == 0
    out = capsys.readouterr().out
    assert "/sys/fs/bpf/istio-cni-x/pods/<netns inode>" in out
    assert "cgroup /host/sys/fs/cgroup" in out


def test_render_virtual_interfaces_equals_newest_istio(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.unit.test_iptables_rules import newest_golden

    argv = ["redirect", "render", "--no-ipv6", "--no-dns-capture",
            "--virtual-interfaces", " fake1s0f0, fake1s0f1"]  # fmt: skip
    assert main(argv) == 0
    rules = capsys.readouterr().out.partition("\n# policy routing")[0]
    assert rules == newest_golden("virtual_interfaces")


def test_bad_virtual_interface_is_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["redirect", "render", "--virtual-interfaces", "eth0,not a name"]) == 1
    err = capsys.readouterr().err
    assert "not a name" in err and "reroute-virtual-interfaces" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
