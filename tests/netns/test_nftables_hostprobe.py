"""The host-side nftables probe rule with real packets: a "node" namespace SNATs kubelet's
(UID-matched) TCP to enrolled pods from 169.254.7.127, and the pod's nftables rules let
exactly that traffic past ztunnel's inbound capture. The applier the agent uses
(:class:`NftablesHostProbe`) holds exactly Istio's hostprobe golden plus its sets, keeps
pods' entries across a restart, and removes everything it added."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from cni_plugin.errors import RedirectionError
from cni_plugin.netns import run_in_netns
from cni_plugin.redirection.nftables_backend import NftablesBackend
from cni_plugin.redirection.nftables_host_probe import NftablesHostProbe
from cni_plugin.redirection.nftables_rules import host_probe_sets_text
from cni_plugin.redirection.settings import RedirectSettings

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
