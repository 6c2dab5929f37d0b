"""The host-side nftables probe rule with real packets: a "node" namespace SNATs kubelet's
(UID-matched) TCP to enrolled pods from 169.254.7.127, and the pod's nftables rules let
exactly that traffic past ztunnel's inbound capture. The applier the agent uses
(:class:`NftablesHostProbe`) holds exactly Istio's hostprobe golden plus its sets, keeps
pods' entries across a restart, and removes everything it added. The whole agent with
NATIVE_NFTABLES enrols pods with nftables rules, syncs and heals the host probe on a
reconcile pass, and an uninstall leaves the node namespace as it was; a node still holding
the iptables probe ipsets keeps iptables (Istio's migration rule)."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from cni_plugin import constants as c
from cni_plugin.errors import RedirectionError
from cni_plugin.netns import run_in_netns
from cni_plugin.redirection.nftables_backend import NftablesBackend
from cni_plugin.redirection.nftables_host_probe import NftablesHostProbe
from cni_plugin.redirection.nftables_rules import host_probe_sets_text
from cni_plugin.redirection.registry import make_backend
from cni_plugin.redirection.settings import RedirectSettings
from node_agent.agent_assembly import Agent
from node_agent.backend_selection import select_backend
from node_agent.host_probe import HostProbe
from node_agent.node_namespace import iptables_probe_sets
from tests.agent_fakes import wait_for
from tests.netns.test_agent_netns import AMBIENT, Env
from tests.throwaway_node import agent_config, own_namespaces
from tests.time_scale import scaled
from tests.unit.test_kubelet_uid import proc

pytestmark = pytest.mark.netns

NODE_IP, POD_IP = "10.231.8.1", "10.231.8.2"
KUBELET_UID = 1000
SETTINGS = replace(RedirectSettings(), ipv6=False)
GOLDEN_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "istio-1.28"
GOLDEN_DIR = GOLDEN_DIR / "nftables"


def run(*argv: str, stdin: str | None = None) -> None:
    subprocess.run(argv, input=stdin, text=True, check=True, capture_output=True)


def listen(ns: str, port: int) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket()
        s.settimeout(3)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        s.listen(4)
        return s

    return run_in_netns(f"/run/netns/{ns}", make)


def connect_from_node(node: str, uid: int) -> None:
    code = f"import socket; socket.create_connection(({POD_IP!r}, 9090), timeout=3).close()"
    run(
        "ip",
        "netns",
        "exec",
        node,
        "setpriv",
        f"--reuid={uid}",
        f"--regid={uid}",
        "--clear-groups",
        sys.executable,
        "-c",
        code,
    )


def accepted_by(listeners: dict[str, socket.socket]) -> tuple[str, str]:
    for name, lst in listeners.items():
        lst.setblocking(False)
        try:
            conn, peer = lst.accept()
        except BlockingIOError:
            continue
        conn.close()
        return name, peer[0]
    raise AssertionError("no listener accepted the connection")


@pytest.mark.parametrize("enrolled", [True, False], ids=["enrolled", "not-enrolled"])
def test_kubelet_probe_is_snatted_and_bypasses_capture(
    make_netns: Callable[[str], str], enrolled: bool
) -> None:
    node, pod = make_netns("node"), make_netns("pod")
    run(
        "ip",
        "-n",
        node,
        "link",
        "add",
        "veth0",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        pod,
    )
    run("ip", "-n", node, "addr", "add", f"{NODE_IP}/24", "dev", "veth0")
    run("ip", "-n", pod, "addr", "add", f"{POD_IP}/24", "dev", "eth0")
    run("ip", "-n", node, "link", "set", "veth0", "up")
    run("ip", "-n", pod, "link", "set", "eth0", "up")
    run("ip", "-n", pod, "route", "add", "default", "via", NODE_IP)

    # The host side through the agent's applier: the sets, the UID-matched SNAT rule, and
    # the pod's address as it is added on enrolment.
    probe = NftablesHostProbe(kubelet_uid=KUBELET_UID, ipv6=False, node_netns=f"/run/netns/{node}")
    probe.setup()
    if enrolled:
        probe.add("pod-uid-1", (POD_IP,))
    NftablesBackend().apply(f"/run/netns/{pod}", SETTINGS)

    listeners = {"app": listen(pod, 9090), "ztunnel-inbound": listen(pod, 15006)}
    try:
        connect_from_node(node, KUBELET_UID)
        got_kubelet = accepted_by(listeners)
        connect_from_node(node, 0)
        got_other = accepted_by(listeners)
    finally:
        for lst in listeners.values():
            lst.close()

    if enrolled:
        assert got_kubelet == ("app", "169.254.7.127")
    else:
        assert got_kubelet == ("ztunnel-inbound", NODE_IP)
    # Any other node process (not kubelet's UID) is captured like pod traffic.
    assert got_other == ("ztunnel-inbound", NODE_IP)


def nft_ruleset(ns: str) -> str:
    out = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "ruleset"],
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    return re.sub(r"counter packets \d+ bytes \d+", "counter", out)


@pytest.mark.parametrize("ipv6", [False, True], ids=["ipv4", "ipv6"])
def test_host_probe_applier_installs_the_golden_and_removes_it_exactly(
    make_netns: Callable[[str], str], ipv6: bool
) -> None:
    node = make_netns("host")
    # Someone else's table in the "host" namespace must survive everything we do.
    run("ip", "netns", "exec", node, "nft", "add table inet keepme; add chain inet keepme c; "
        "add rule inet keepme c tcp dport 9 counter accept")  # fmt: skip
    before = nft_ruleset(node)
    probe = NftablesHostProbe(
        kubelet_uid=KUBELET_UID,
        ipv6=ipv6,
        node_netns=f"/run/netns/{node}",
        snat_v6="e9ac:1e77:90ca:399f:4d6d:ece2:2f9b:3164",
    )
    probe.setup()
    # What the kernel holds is what Istio's golden gives, plus the sets it refers to.
    ref = make_netns("ref")
    golden = GOLDEN_DIR / ("hostprobe_ipv6.golden" if ipv6 else "hostprobe.golden")
    run("ip", "netns", "exec", ref, "nft", "-f", "-",
        stdin=host_probe_sets_text(ipv6) + golden.read_text())  # fmt: skip
    assert probe.render().endswith(golden.read_text())
    ours = nft_ruleset(node)
    assert ours.replace(before, "") == nft_ruleset(ref)

    pods = {"uid-a": ("10.231.9.5", "2001:db8:9::5"), "uid-b": ("10.231.9.6",)}
    for uid, ips in pods.items():
        probe.add(uid, ips)
    want = {"10.231.9.5": "uid-a", "10.231.9.6": "uid-b"}
    if ipv6:
        want["2001:db8:9::5"] = "uid-a"
    assert probe.members() == want
    # Re-running setup (an agent restart) keeps every pod's entry and the same rules.
    probe.setup()
    assert probe.members() == want
    assert nft_ruleset(node).count("snat ip to") == 1
    with pytest.raises(RedirectionError, match="cannot label"):
        probe.add('x" } ; flush ruleset ; #', ("10.231.9.7",))
    assert probe.members() == want
    # A pod's removal only takes its own entries; an address now owned by another pod stays.
    probe.remove("uid-other", ("10.231.9.6",))
    probe.remove("uid-a", pods["uid-a"])
    assert probe.members() == {"10.231.9.6": "uid-b"}

    probe.remove_rules()
    left = nft_ruleset(node)
    assert "postrouting" not in left and "istio-inpod-probes-v4" in left
    assert probe.members() == {"10.231.9.6": "uid-b"}
    probe.teardown()
    assert nft_ruleset(node) == before
    probe.teardown()  # absent is not an error
    probe.remove_rules()
    probe.teardown()
    assert nft_ruleset(node) == before
    assert probe.members() == {}


def test_host_probe_applier_reports_a_kernel_refusal_in_one_line(
    make_netns: Callable[[str], str],
) -> None:
    node = make_netns("host")
    probe = NftablesHostProbe(kubelet_uid=0, ipv6=False, node_netns=f"/run/netns/{node}",
                              snat_v4="not-an-address")  # fmt: skip
    before = nft_ruleset(node)
    with pytest.raises(RedirectionError) as err:
        probe.setup()
    assert "installing the host probe rules" in str(err.value) and "\n" not in str(err.value)
    assert nft_ruleset(node) == before


# --- the agent driving the nftables host probe (NATIVE_NFTABLES) -----------------------


def node_state(node_netns: str) -> str:
    """Everything a host probe of either kind can leave in the node namespace."""

    def out(*argv: str) -> str:
        return subprocess.run(["nsenter", f"--net={node_netns}", "--", *argv],
                              check=True, capture_output=True, text=True).stdout  # fmt: skip

    return out("ipset", "list", "-n") + out("nft", "list", "ruleset")


def in_node(node_netns: str, script: str) -> None:
    run("nsenter", f"--net={node_netns}", "--", "nft", "-f", "-", stdin=script)


@pytest.fixture
def native_env(tmp_path: Path) -> Iterator[Env]:
    """The whole agent (tests/netns/test_agent_netns.py's Env) with NATIVE_NFTABLES on: the
    nftables pod backend, and a kubelet (UID 1000) in its staged /proc."""
    with own_namespaces("icnin") as make:
        e = Env(tmp_path, make)
        proc(e.proc, 40, "kubelet", ["/usr/bin/kubelet", "--config=/k.yaml"], KUBELET_UID)
        e.cfg = replace(e.cfg, native_nftables=True, backend="nftables", backend_from_native=True)
        e.backend = make_backend("nftables")
        e.probe = NftablesHostProbe(  # type: ignore[assignment]
            kubelet_uid=KUBELET_UID, ipv6=True, node_netns=e.node_netns
        )
        try:
            yield e
        finally:
            e.close()
            HostProbe(ipv6=True, node_netns=e.node_netns).teardown()


def test_agent_with_native_nftables_enrols_heals_and_uninstalls_to_nothing(
    native_env: Env,
) -> None:
    env = native_env
    before = node_state(env.node_netns)
    env.kube.put_namespace("shop", AMBIENT)
    pods = [env.stage("shop", f"web-{i}") for i in range(2)]
    env.start_ztunnel()
    agent = Agent(env.cfg, kube=env.kube, rules=env.backend, is_upgrade=lambda: False)
    env.agent = agent
    agent.start(sync_timeout=scaled(10))
    wait_for(lambda: all(env.enrolled(p) for p in pods), what="enrolled")
    probe = agent.host_probe
    assert isinstance(probe, NftablesHostProbe) and probe.kubelet_uid == KUBELET_UID
    # Pods' rules are nftables ones; the host side is nftables only (no ipset at all).
    assert all(env.rules_ok(p) for p in pods)
    assert probe.members() == {p.ip: p.uid for p in pods}
    state = node_state(env.node_netns)
    assert "istio-inpod-probes" not in state.split("table", 1)[0]
    assert f"meta skuid {KUBELET_UID} ip daddr @istio-inpod-probes-v4" in state
    assert probe.drift() == []

    # Drift: the SNAT chain gone, a pod's entry lost, a stale entry of a pod long gone.
    v4 = "inet istio-ambient-nat istio-inpod-probes-v4"
    in_node(env.node_netns, "delete chain inet istio-ambient-nat postrouting\n"
            f"delete element {v4} {{ {pods[0].ip} }}\n"
            f'add element {v4} {{ 10.77.0.9 comment "gone" }}\n')  # fmt: skip
    assert probe.drift() == ["chain postrouting absent"]
    agent.reconciler.run_pass()
    assert probe.drift() == []
    assert probe.members() == {p.ip: p.uid for p in pods}
    # A rule someone added to our chain is drift too.
    in_node(env.node_netns, "add rule inet istio-ambient-nat postrouting counter accept\n")
    assert probe.drift() and probe.ensure() and probe.drift() == []

    # Restart after a node reboot: empty sets, the agent re-adds the adopted pods.
    agent.stop(uninstall=False)
    env.agent = None
    in_node(env.node_netns, "flush set inet istio-ambient-nat istio-inpod-probes-v4\n")
    agent = Agent(env.cfg, kube=env.kube, rules=env.backend, is_upgrade=lambda: False)
    env.agent = agent
    agent.start(sync_timeout=scaled(10))
    assert env.probe.members() == {p.ip: p.uid for p in pods}

    # Uninstall after unlabelling: the node namespace exactly as before the install.
    env.kube.put_namespace("shop", {})
    wait_for(lambda: not env.probe.members(), what="the pods out of the probe set")
    agent.stop()
    env.agent = None
    assert node_state(env.node_netns) == before
    # An enrolment still in flight after the uninstall cannot bring the table back.
    agent.host_probe.add("late-uid", ("10.99.9.9",))  # type: ignore[union-attr]
    agent.host_probe.sync({"late-uid": ("10.99.9.9",)})  # type: ignore[union-attr]
    assert not agent.host_probe.ensure()  # type: ignore[union-attr]
    assert node_state(env.node_netns) == before


def test_native_nftables_keeps_iptables_while_the_node_holds_the_probe_ipsets(
    make_netns: Callable[[str], str], tmp_path: Path
) -> None:
    """Istio's migration rule on the real kernel: an agent that ran with iptables and was
    upgraded (not uninstalled) left the probe ipsets; the new agent stays on iptables."""
    node = f"/run/netns/{make_netns('node')}"
    cfg = replace(agent_config(tmp_path, node), native_nftables=True, backend="nftables",
                  backend_from_native=True)  # fmt: skip
    assert iptables_probe_sets(node) == (False, "no istio probe ipset")
    sel = select_backend(cfg)
    assert (sel.rules.name, sel.host_probe) == ("nftables", "nftables")
    run("nsenter", f"--net={node}", "--", "ipset", "create", c.PROBE_IPSET_V4, "hash:ip")
    try:
        assert iptables_probe_sets(node) == (True, c.PROBE_IPSET_V4)
        sel = select_backend(cfg)
        assert (sel.rules.name, sel.host_probe) == ("iptables", "iptables")
    finally:
        run("nsenter", f"--net={node}", "--", "ipset", "destroy", c.PROBE_IPSET_V4)


def redirect(node_netns: str, *args: str, native: bool) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "NODE_NETNS": node_netns,
           "NATIVE_NFTABLES": "true" if native else "false", "AMBIENT_IPV6": "false"}  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "node_agent.cli", "redirect", *args, "--backend", "nftables"],
        env=env, cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True,
        timeout=scaled(120),
    )  # fmt: skip


def test_redirect_check_and_uninstall_node_see_the_nftables_host_probe(
    make_netns: Callable[[str], str],
) -> None:
    node = f"/run/netns/{make_netns('node')}"
    before = node_state(node)
    probe = NftablesHostProbe(kubelet_uid=0, ipv6=False, node_netns=node)
    probe.setup()
    probe.add("uid-a", ("10.231.9.5",))
    check = redirect(node, "check", native=True)
    assert check.returncode == 0, check
    assert "node: host probe (nftables, kubelet uid 0): table inet istio-ambient-nat in " \
           "place, 1 entry in istio-inpod-probes-v4" in check.stdout, check.stdout  # fmt: skip
    refused = redirect(node, "uninstall-node", native=False)
    assert refused.returncode == 1 and "1 pod address(es) still in them" in refused.stdout
    assert probe.members() == {"10.231.9.5": "uid-a"}
    probe.remove("uid-a", ("10.231.9.5",))
    done = redirect(node, "uninstall-node", native=False)
    assert done.returncode == 0, done
    assert "native nftables host probe table inet istio-ambient-nat removed" in done.stdout
    assert node_state(node) == before
