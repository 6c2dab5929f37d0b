"""The host probe rule and sets over the agent's life, on the real kernel (issue 14.5, 14.6,
14.7, 17.7): adoption at start re-adds enrolled pods' addresses (a node restart empties the
sets) and prunes stale ones; the jump sits first in POSTROUTING and is put back by a
reconcile pass; an uninstall leaves the node namespace exactly as before the install; the
rule goes to the xtables variant given; a node without IPv6 (disabled in its namespace, or a
kernel booted with ``ipv6.disable=1``, under qemu) runs IPv4 only."""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from cni_plugin import constants as c
from node_agent.agent_assembly import Agent
from node_agent.host_probe import JUMP, HostProbe
from tests.agent_fakes import wait_for
from tests.netns.test_agent_netns import AMBIENT, Env
from tests.throwaway_node import own_namespaces
from tests.time_scale import scaled

pytestmark = pytest.mark.netns


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    with own_namespaces("icnih") as make:
        e = Env(tmp_path, make)
        try:
            yield e
        finally:
            e.close()


def in_node(env: Env, *argv: str, stdin: str | None = None) -> str:
    r = subprocess.run(
        ["nsenter", f"--net={env.node_netns}", "--", *argv],
        input=stdin, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return r.stdout


def node_state(env: Env) -> str:
    """Everything the host side can leave in the node namespace."""
    parts = [in_node(env, "ipset", "list", "-n")]
    for cmd in ("iptables-legacy-save", "ip6tables-legacy-save", "iptables-nft-save",
                "ip6tables-nft-save"):  # fmt: skip
        parts.append("\n".join(ln for ln in in_node(env, cmd).splitlines() if ln[:1] not in "#"))
    parts.append(in_node(env, "nft", "list", "ruleset"))
    return "\n".join(parts)


def post_rules(env: Env, variant: str) -> list[str]:
    saved = in_node(env, f"iptables-{variant}-save", "-t", "nat")
    return [ln for ln in saved.splitlines() if ln.startswith("-A POSTROUTING ")]


def start(env: Env, **kw: object) -> Agent:
    env.agent = Agent(env.cfg, kube=env.kube, rules=env.backend, **kw)  # type: ignore[arg-type]
    env.agent.start(sync_timeout=scaled(10))
    return env.agent


def test_restart_readds_adopted_pods_probe_ips_and_prunes_stale(env: Env) -> None:
    env.kube.put_namespace("shop", AMBIENT)
    pods = [env.stage("shop", f"web-{i}") for i in range(3)]
    env.start_ztunnel()
    start(env)
    wait_for(lambda: all(env.enrolled(p) for p in pods), what="enrolled")
    env.stop_agent()
    # A node restart: the sets come back empty; a stale entry of a pod long gone.
    in_node(env, "ipset", "flush", c.PROBE_IPSET_V4)
    in_node(env, "ipset", "add", c.PROBE_IPSET_V4, "10.77.0.9", "comment", "gone-uid")
    start(env)
    assert env.probe.members() == {p.ip: p.uid for p in pods}


def test_jump_is_first_and_a_reconcile_pass_repairs_rule_and_set(env: Env) -> None:
    variant = HostProbe(node_netns=env.node_netns).variant
    # Another component's rule already in POSTROUTING: ours must still come first.
    in_node(env, f"iptables-{variant}", "-w", "-t", "nat", "-A", "POSTROUTING", "-j", "RETURN")
    env.kube.put_namespace("shop", AMBIENT)
    pod = env.stage("shop", "api")
    env.start_ztunnel()
    agent = start(env)
    wait_for(lambda: env.enrolled(pod), what="enrolled")
    assert post_rules(env, variant)[0] == JUMP
    # Drift: jump moved behind the other rule, the pod's entry lost.
    in_node(env, f"iptables-{variant}", "-w", "-t", "nat", "-D", "POSTROUTING", "-j",
            c.CHAIN_POSTROUTING)  # fmt: skip
    in_node(env, f"iptables-{variant}", "-w", "-t", "nat", "-A", "POSTROUTING", "-j",
            c.CHAIN_POSTROUTING)  # fmt: skip
    in_node(env, "ipset", "del", c.PROBE_IPSET_V4, pod.ip)
    agent.reconciler.run_pass()
    rules = post_rules(env, variant)
    assert rules[0] == JUMP and rules.count(JUMP) == 1
    assert env.probe.members() == {pod.ip: pod.uid}


def test_uninstall_leaves_the_node_namespace_exactly_as_before(env: Env) -> None:
    before = node_state(env)
    env.kube.put_namespace("shop", AMBIENT)
    pods = [env.stage("shop", f"db-{i}") for i in range(2)]
    env.start_ztunnel()
    agent = start(env, is_upgrade=lambda: False)
    wait_for(lambda: all(env.enrolled(p) for p in pods), what="enrolled")
    assert node_state(env) != before
    # Unlabel first, as Istio documents (pods still enrolled at uninstall keep the rule
    # and sets for their kubelet probes: tests/testbed/test_plugin_deploy.py).
    env.kube.put_namespace("shop", {})
    wait_for(lambda: not env.probe.members(), what="the pods out of the probe set")
    # Pods arriving as the uninstall starts, with no ztunnel to take them: their
    # enrolments are in flight (rules, pending) and race it; the node namespace must come
    # out as before.
    assert env.recorder is not None
    env.recorder.stop()
    env.kube.put_namespace("late", AMBIENT)
    for i in range(3):
        env.stage("late", f"late-{i}")
    t0 = time.monotonic()
    agent.stop()
    took = time.monotonic() - t0
    env.agent = None
    assert node_state(env) == before
    assert took < 5.0, f"uninstall took {took:.1f}s, beyond the 5 s grace period"
    # An enrolment still in flight after the uninstall cannot bring the set back.
    agent.host_probe.add("late-uid", ("10.99.9.9",))  # type: ignore[union-attr]
    assert node_state(env) == before


@pytest.mark.parametrize("variant", ["legacy", "nft"])
def test_host_rule_goes_to_the_given_xtables_variant(env: Env, variant: str) -> None:
    other = "nft" if variant == "legacy" else "legacy"
    probe = HostProbe(ipv6=True, node_netns=env.node_netns, variant=variant)
    probe.setup()
    try:
        assert post_rules(env, variant) == [JUMP]
        assert post_rules(env, other) == []
    finally:
        probe.teardown()
    assert post_rules(env, variant) == []


@pytest.fixture
def no_ipv6() -> Callable[[str], None]:
    def disable(netns: str) -> None:
        for key in ("all", "default", "lo"):
            subprocess.run(
                ["nsenter", f"--net={netns}", "--", "sysctl", "-qw",
                 f"net.ipv6.conf.{key}.disable_ipv6=1"],
                check=True,
            )  # fmt: skip

    return disable


def test_node_without_ipv6_runs_ipv4_only_with_one_warning(
    env: Env, no_ipv6: Callable[[str], None], caplog: pytest.LogCaptureFixture
) -> None:
    no_ipv6(env.node_netns)
    env.kube.put_namespace("shop", AMBIENT)
    pod = env.stage("shop", "v4only")
    no_ipv6(pod.netns)
    env.start_ztunnel()
    caplog.set_level(logging.WARNING)
    agent = start(env)  # AMBIENT_IPV6 on (the default)
    wait_for(lambda: env.enrolled(pod), what="enrolled over IPv4 only")
    warnings = [r for r in caplog.records if "IPv6 unavailable" in r.getMessage()]
    assert len(warnings) == 1
    assert agent.cfg.ipv6 is False
    assert c.PROBE_IPSET_V6 not in in_node(env, "ipset", "list", "-n")


KERNEL_WITHOUT_IPV6 = not Path("/proc/sys/net/ipv6").exists()


@pytest.mark.skipif(
    not KERNEL_WITHOUT_IPV6,
    reason="needs a kernel booted with ipv6.disable=1: make vm-test-one KERNEL_ARGS=ipv6.disable=1 "
    "VM_PYTEST_ARGS='tests/netns/test_host_probe_lifecycle.py -k kernel_without_ipv6'",
)
def test_kernel_without_ipv6_runs_ipv4_only_with_one_warning(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    # ipv6.disable=1: no /proc/sys/net/ipv6 and no IPv6 sockets at all, in every namespace.
    env.kube.put_namespace("shop", AMBIENT)
    pod = env.stage("shop", "nov6")
    env.start_ztunnel()
    caplog.set_level(logging.WARNING)
    agent = start(env)  # AMBIENT_IPV6 on (the default)
    wait_for(lambda: env.enrolled(pod), what="enrolled over IPv4 only")
    warnings = [r for r in caplog.records if "IPv6 unavailable" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    reason = warnings[0].fields["reason"]  # type: ignore[attr-defined]
    assert "ipv6.disable=1" in reason, reason
    assert agent.cfg.ipv6 is False
    assert env.probe.members() == {pod.ip: pod.uid}
    assert c.PROBE_IPSET_V6 not in in_node(env, "ipset", "list", "-n")


def test_node_namespace_reached_through_host_proc_1(env: Env) -> None:
    # ambient.shareHostNetworkNamespace=false: the chart's ALLOW_SWITCH_TO_HOST_NS points
    # the agent at <HOST_PROC>/1/ns/net; here the staged proc tree's pid 1 is the "node".
    (env.proc / "1" / "ns").mkdir(parents=True)
    (env.proc / "1" / "ns" / "net").symlink_to(env.node_netns)
    cfg = replace(env.cfg, node_netns=str(env.proc / "1" / "ns" / "net"))
    env.kube.put_namespace("shop", AMBIENT)
    pod = env.stage("shop", "far")
    env.start_ztunnel()
    # No backend injected: the in-pod iptables backend is built for the node's variant too.
    env.agent = Agent(cfg, kube=env.kube)
    env.agent.start(sync_timeout=scaled(10))
    wait_for(lambda: env.enrolled(pod), what="enrolled")
    variant = env.agent.host_probe.variant  # type: ignore[union-attr]
    assert env.agent.selection.xtables_variant() == variant
    assert post_rules(env, variant)[0] == JUMP
    assert env.probe.members() == {pod.ip: pod.uid}
