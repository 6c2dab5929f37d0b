"""Native nftables as Istio names it (issue 17 item 3): ``NATIVE_NFTABLES`` against our own
``AMBIENT_REDIRECT_MODE`` (precedence, docs/istio-parity.md), Istio's migration rule (a node
still holding the iptables probe ipsets stays on iptables), the host probe the agent then
builds, the plugin entry the installer writes, and the chart value ``global.nativeNftables``
reaching the DaemonSet's environment (rendered ConfigMap against its golden)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from cni_plugin import cni_spec
from cni_plugin.cni_spec import CniError
from cni_plugin.errors import ConfigError
from cni_plugin.redirection.nftables_host_probe import NftablesHostProbe
from install import conflist, render_manifests
from install.config import InstallConfig
from node_agent.backend_selection import native_nftables_plan, select_backend
from node_agent.config import AgentConfig, redirect_backend
from node_agent.host_probe import HostProbe
from tests.unit.test_kubelet_uid import proc

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "chart"
ISTIO_128 = Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "istio-1.28"


@pytest.mark.parametrize(
    ("env", "want"),
    [
        ({}, ("iptables", False)),
        ({"NATIVE_NFTABLES": "false"}, ("iptables", False)),
        ({"NATIVE_NFTABLES": "true"}, ("nftables", True)),
        # The chart always renders AMBIENT_REDIRECT_MODE (default iptables): native wins.
        ({"NATIVE_NFTABLES": "true", "AMBIENT_REDIRECT_MODE": "iptables"}, ("nftables", True)),
        ({"NATIVE_NFTABLES": "TRUE", "REDIRECTION_BACKEND": "iptables"}, ("nftables", True)),
        # Our own explicit choices stay.
        ({"NATIVE_NFTABLES": "true", "AMBIENT_REDIRECT_MODE": "nftables"}, ("nftables", False)),
        ({"NATIVE_NFTABLES": "true", "AMBIENT_REDIRECT_MODE": "ebpf"}, ("ebpf", False)),
        ({"AMBIENT_REDIRECT_MODE": "nftables"}, ("nftables", False)),
        ({"NATIVE_NFTABLES": "false", "AMBIENT_REDIRECT_MODE": "nftables"}, ("nftables", False)),
        ({"AMBIENT_REDIRECT_MODE": "ebpf", "REDIRECTION_BACKEND": "nftables"}, ("ebpf", False)),
        ({"REDIRECTION_BACKEND": "nftables"}, ("nftables", False)),
    ],
)
def test_redirect_backend_precedence(env: dict[str, str], want: tuple[str, bool]) -> None:
    assert redirect_backend(env) == want
    cfg = AgentConfig.from_env({**env, "NODE_NAME": "n1"})
    assert (cfg.backend, cfg.backend_from_native) == want
    assert cfg.native_nftables is (env.get("NATIVE_NFTABLES", "").lower() == "true")


def test_bad_values_are_named() -> None:
    with pytest.raises(ConfigError, match=r"^NATIVE_NFTABLES='yes please' is not a boolean"):
        AgentConfig.from_env({"NODE_NAME": "n1", "NATIVE_NFTABLES": "yes please"})
    with pytest.raises(ConfigError, match=r"^AMBIENT_REDIRECT_MODE='nft': set iptables, nf"):
        AgentConfig.from_env({"NODE_NAME": "n1", "AMBIENT_REDIRECT_MODE": "nft"})
    with pytest.raises(ConfigError, match=r"^REDIRECTION_BACKEND='bpf'"):
        AgentConfig.from_env({"NODE_NAME": "n1", "REDIRECTION_BACKEND": "bpf"})


def test_a_backend_flag_is_the_operators_own_choice() -> None:
    cfg = AgentConfig.from_env({"NODE_NAME": "n1", "NATIVE_NFTABLES": "true"})
    flagged = cfg.with_overrides(backend="iptables")
    assert (flagged.backend, flagged.backend_from_native, flagged.native_nftables) == (
        "iptables",
        False,
        True,
    )
    assert cfg.with_overrides(backend=None) == cfg


def cfg_of(**env: str) -> AgentConfig:
    return AgentConfig.from_env({"NODE_NAME": "n1", **env})


@pytest.mark.parametrize(
    ("env", "ipsets", "want"),
    [
        ({}, True, ("iptables", "iptables")),
        ({}, False, ("iptables", "iptables")),
        ({"AMBIENT_REDIRECT_MODE": "nftables"}, False, ("nftables", "iptables")),
        ({"NATIVE_NFTABLES": "true"}, False, ("nftables", "nftables")),
        # Istio's migration rule: the iptables probe ipsets are still there.
        ({"NATIVE_NFTABLES": "true"}, True, ("iptables", "iptables")),
        # ...but pods that were nftables all along stay so.
        (
            {"NATIVE_NFTABLES": "true", "AMBIENT_REDIRECT_MODE": "nftables"},
            True,
            ("nftables", "iptables"),
        ),
        (
            {"NATIVE_NFTABLES": "true", "AMBIENT_REDIRECT_MODE": "ebpf"},
            False,
            ("ebpf", "nftables"),
        ),
        ({"NATIVE_NFTABLES": "true", "AMBIENT_REDIRECT_MODE": "ebpf"}, True, ("ebpf", "iptables")),
    ],
)
def test_native_nftables_plan(env: dict[str, str], ipsets: bool, want: tuple[str, str]) -> None:
    assert native_nftables_plan(cfg_of(**env), ipsets) == want


def test_select_backend_asks_for_the_ipsets_only_with_native_nftables() -> None:
    def never(ns: str) -> tuple[bool, str]:
        raise AssertionError("ipsets looked for without NATIVE_NFTABLES")

    sel = select_backend(cfg_of(AMBIENT_REDIRECT_MODE="nftables"), probe_sets=never)
    assert (sel.rules.name, sel.host_probe) == ("nftables", "iptables")

    asked: list[str] = []

    def absent(ns: str) -> tuple[bool, str]:
        asked.append(ns)
        return False, "no istio probe ipset"

    sel = select_backend(cfg_of(NATIVE_NFTABLES="true", NODE_NETNS="/x"), probe_sets=absent)
    assert (sel.rules.name, sel.host_probe, asked) == ("nftables", "nftables", ["/x"])
    sel = select_backend(
        cfg_of(NATIVE_NFTABLES="true"), probe_sets=lambda ns: (True, "istio-inpod-probes-v4")
    )
    assert (sel.rules.name, sel.host_probe) == ("iptables", "iptables")


def test_the_nftables_host_probe_matches_the_kubelet_found_in_proc(tmp_path: Path) -> None:
    proc(tmp_path, 40, "kubelet", ["/usr/bin/kubelet", "--config=/k.yaml"], 1000)
    cfg = cfg_of(NATIVE_NFTABLES="true", HOST_PROC=str(tmp_path), AMBIENT_IPV6="false")
    sel = select_backend(cfg, probe_sets=lambda ns: (False, ""))
    probe = sel.host_probe_rules(cfg)
    assert isinstance(probe, NftablesHostProbe) and probe.kubelet_uid == 1000
    # What it installs ends with Istio's golden, exactly.
    assert probe.render().endswith((ISTIO_128 / "nftables" / "hostprobe.golden").read_text())
    iptables = select_backend(cfg_of(HOST_PROC=str(tmp_path))).host_probe_rules(cfg)
    assert isinstance(iptables, HostProbe)
    # No kubelet to be seen: the agent refuses to start, naming what it needs.
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"no kubelet process found.*hostPID or a /proc mount"):
        sel.host_probe_rules(cfg_of(NATIVE_NFTABLES="true", HOST_PROC=str(empty)))


@pytest.mark.parametrize(
    ("ipv6", "golden"), [(False, "hostprobe.golden"), (True, "hostprobe_ipv6.golden")]
)
def test_host_probe_ruleset_is_istios_golden(ipv6: bool, golden: str) -> None:
    probe = NftablesHostProbe(
        kubelet_uid=1000, ipv6=ipv6, snat_v6="e9ac:1e77:90ca:399f:4d6d:ece2:2f9b:3164"
    )
    text = (ISTIO_128 / "nftables" / golden).read_text()
    sets, _, rules = probe.render().partition("add table inet istio-ambient-nat\nflush")
    assert "flush" + rules == text.split("add table inet istio-ambient-nat\n", 1)[1]
    assert sets.count("add set") == (2 if ipv6 else 1)


def test_installer_writes_native_nftables_only_when_on() -> None:
    off = InstallConfig.from_env({})
    on = InstallConfig.from_env({"NATIVE_NFTABLES": "true"})
    assert (off.native_nftables, on.native_nftables) == (None, True)
    assert InstallConfig.from_env({"NATIVE_NFTABLES": "false"}).native_nftables is None
    base = ("info", "/var/run/istio-cni", True, "kube-system", "istio-cni")
    assert "native_nftables" not in conflist.PluginEntry(*base).to_dict()
    entry = conflist.PluginEntry(*base, native_nftables=on.native_nftables).to_dict()
    assert entry["native_nftables"] is True


def _plugin_conf(**extra: Any) -> bytes:
    conf = {"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "istio-cni", **extra}
    return json.dumps(conf).encode()


def test_plugin_accepts_native_nftables_and_names_a_bad_one() -> None:
    for value in (True, False):
        assert (
            cni_spec.parse_config(_plugin_conf(native_nftables=value), "ADD")["native_nftables"]
            is value
        )
    with pytest.raises(CniError, match="field 'native_nftables' must be true or false"):
        cni_spec.parse_config(_plugin_conf(native_nftables="yes"), "ADD")


def _configmap(values: dict[str, Any]) -> dict[str, Any]:
    rendered = render_manifests.render(values, "istio-cni")
    doc = yaml.safe_load(rendered["istio-cni/templates/configmap.yaml"])
    assert isinstance(doc, dict)
    return doc


def test_chart_value_reaches_the_agent_and_the_installer() -> None:
    plain = _configmap({"profile": "ambient"})["data"]
    assert plain["NATIVE_NFTABLES"] == "false"
    cfg = AgentConfig.from_env({**plain, "NODE_NAME": "n1"})
    assert (cfg.native_nftables, cfg.backend) == (False, "iptables")

    native = _configmap({"profile": "ambient", "global": {"nativeNftables": True}})["data"]
    assert native["NATIVE_NFTABLES"] == "true" and native["AMBIENT_REDIRECT_MODE"] == "iptables"
    cfg = AgentConfig.from_env({**native, "NODE_NAME": "n1"})
    assert (cfg.native_nftables, cfg.backend, cfg.backend_from_native) == (True, "nftables", True)
    assert InstallConfig.from_env(native).native_nftables is True
    # The DaemonSet takes its environment from that ConfigMap.
    rendered = render_manifests.render(
        {"profile": "ambient", "global": {"nativeNftables": True}}, "istio-cni"
    )
    ds = yaml.safe_load(rendered["istio-cni/templates/daemonset.yaml"])
    container = ds["spec"]["template"]["spec"]["containers"][0]
    assert {"configMapRef": {"name": "istio-cni-config"}} in container["envFrom"]


def test_chart_rejects_a_non_boolean_native_nftables() -> None:
    from helm_python.errors import HelmError

    with pytest.raises(HelmError, match="nativeNftables"):
        render_manifests.render({"global": {"nativeNftables": "yes"}}, "istio-cni")


def test_rendered_configmap_with_native_nftables_is_the_golden() -> None:
    """The whole ConfigMap for profile ambient + global.nativeNftables=true. Regenerate with
    ``UPDATE_GOLDEN=1`` after a deliberate chart change (and review the diff)."""
    rendered = render_manifests.render(
        {"profile": "ambient", "global": {"nativeNftables": True}}, "istio-cni"
    )["istio-cni/templates/configmap.yaml"]
    golden = GOLDEN / "configmap-native-nftables.yaml.golden"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(rendered)
    assert rendered == golden.read_text()
