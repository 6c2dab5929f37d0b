"""Agent config (SPEC §4 names and defaults), host-path mapping, host probe rule text
against Istio's goldens, and the pods table."""

from __future__ import annotations

from pathlib import Path

import pytest

from cni_plugin.errors import ConfigError
from node_agent import pods_command
from node_agent.config import AgentConfig
from node_agent.host_probe import render_hostprobe
from node_agent.state import SCHEMA_VERSION, AgentState

GOLDEN = (
    Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "istio-1.24" / "iptables"
)


def test_defaults_are_istio_124() -> None:
    cfg = AgentConfig.from_env({"NODE_NAME": "n1"})
    assert cfg.ambient_enabled and cfg.ipv6 and not cfg.dns_capture and cfg.chained
    assert cfg.run_dir == "/var/run/istio-cni"
    assert cfg.ztunnel_socket == "/var/run/ztunnel/ztunnel.sock"
    assert cfg.mounted_cni_net_dir == "/host/etc/cni/net.d"
    assert cfg.excluded_namespaces == ("kube-system",)
    assert cfg.system_namespace == "istio-system"
    assert cfg.monitoring_port == 15014
    assert cfg.host_probe_snat_ipv4 == "169.254.7.127"
    assert cfg.host_probe_snat_ipv6 == "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"
    assert cfg.plugin_event_socket == "/var/run/istio-cni/pluginevent.sock"


def test_env_overrides_and_errors() -> None:
    cfg = AgentConfig.from_env(
        {
            "NODE_NAME": "n1",
            "AMBIENT_DNS_CAPTURE": "true",
            "AMBIENT_IPV6": "false",
            "EXCLUDE_NAMESPACES": "a, b",
            "MONITORING_PORT": "9999",
            "HOST_PROC": "/proc",
        }
    )
    assert cfg.dns_capture and not cfg.ipv6
    assert cfg.excluded_namespaces == ("a", "b") and cfg.monitoring_port == 9999
    assert cfg.proc_root == "/proc"
    with pytest.raises(ConfigError, match="NODE_NAME"):
        AgentConfig.from_env({})
    with pytest.raises(ConfigError, match="AMBIENT_IPV6"):
        AgentConfig.from_env({"NODE_NAME": "n", "AMBIENT_IPV6": "maybe"})
    with pytest.raises(ConfigError, match="MONITORING_PORT"):
        AgentConfig.from_env({"NODE_NAME": "n", "MONITORING_PORT": "x"})


def test_runtime_netns_paths_map_onto_host_mounts() -> None:
    cfg = AgentConfig(node_name="n")
    assert cfg.host_netns_path("/var/run/netns/cni-1") == "/host/var/run/netns/cni-1"
    assert cfg.host_netns_path("/run/netns/cni-1") == "/host/var/run/netns/cni-1"
    assert cfg.host_netns_path("/proc/42/ns/net") == "/host/proc/42/ns/net"
    local = cfg.with_overrides(netns_dir="/var/run/netns", proc_root="/proc", run_dir=None)
    assert local.host_netns_path("/var/run/netns/cni-1") == "/var/run/netns/cni-1"
    assert local.run_dir == "/var/run/istio-cni"


@pytest.mark.parametrize(
    ("ipv6", "golden"), [(False, "hostprobe.golden"), (True, "hostprobe_ipv6.golden")]
)
def test_host_probe_rule_is_the_golden(ipv6: bool, golden: str) -> None:
    assert "\n".join(render_hostprobe(ipv6)) == (GOLDEN / golden).read_text()


def test_pods_table_shape() -> None:
    doc = {
        "backend": "iptables",
        "pods": [
            {"namespace": "b", "name": "p2", "ips": ["10.0.0.2"], "node": "n", "state": "pending"},
            {"namespace": "a", "name": "p1", "ips": ["10.0.0.1"], "node": "n", "state": "enabled"},
            {
                "namespace": "a",
                "name": "p0",
                "ips": [],
                "node": "n",
                "state": "",
                "decision": "opted_out",
            },
        ],
    }
    lines = pods_command.table(
        AgentState.from_json({"version": SCHEMA_VERSION, **doc})
    ).splitlines()
    assert lines[0].split() == [
        "NAMESPACE",
        "POD",
        "NAME",
        "ADDRESS",
        "NODE",
        "PROTOCOL",
        "BACKEND",
        "STATE",
    ]
    assert lines[1].split() == ["a", "p0", "-", "n", "TCP", "-", "opted-out"]
    assert lines[2].split() == ["a", "p1", "10.0.0.1", "n", "HBONE", "iptables", "enabled"]
    assert lines[3].split() == ["b", "p2", "10.0.0.2", "n", "TCP", "iptables", "pending"]


def test_backend_settings_istio_names() -> None:
    """AMBIENT_REDIRECT_MODE (Helm ambient.redirectMode) wins over the older
    REDIRECTION_BACKEND; AMBIENT_REDIRECT_FALLBACK takes iptables, nftables or none."""
    base = {"NODE_NAME": "n1"}
    cfg = AgentConfig.from_env(base)
    assert (cfg.backend, cfg.backend_fallback) == ("iptables", "")
    assert cfg.bpf_pin_root == "/sys/fs/bpf/istio-cni" and cfg.host_cgroup2_root == ""
    assert AgentConfig.from_env({**base, "REDIRECTION_BACKEND": "nftables"}).backend == "nftables"
    cfg = AgentConfig.from_env(
        {
            **base,
            "AMBIENT_REDIRECT_MODE": "ebpf",
            "REDIRECTION_BACKEND": "nftables",
            "AMBIENT_REDIRECT_FALLBACK": "IPTables",
            "AMBIENT_EBPF_PIN_ROOT": "/sys/fs/bpf/x",
            "HOST_CGROUP2_ROOT": "/host/sys/fs/cgroup",
        }
    )
    assert (cfg.backend, cfg.backend_fallback) == ("ebpf", "iptables")
    assert (cfg.bpf_pin_root, cfg.host_cgroup2_root) == ("/sys/fs/bpf/x", "/host/sys/fs/cgroup")
    assert (
        AgentConfig.from_env({**base, "AMBIENT_REDIRECT_FALLBACK": "none"}).backend_fallback == ""
    )
    with pytest.raises(ConfigError, match="AMBIENT_REDIRECT_FALLBACK='ebpf'"):
        AgentConfig.from_env({**base, "AMBIENT_REDIRECT_FALLBACK": "ebpf"})
