"""The host-side nftables probe rule with real packets: a "node" namespace SNATs kubelet's
(UID-matched) TCP to enrolled pods from 169.254.7.127, and the pod's nftables rules let
exactly that traffic past ztunnel's inbound capture."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace

import pytest

from cni_plugin.netns import run_in_netns
from cni_plugin.redirection.nftables_backend import NftablesBackend
from cni_plugin.redirection.nftables_rules import host_probe_ruleset, host_probe_sets_text
from cni_plugin.redirection.settings import RedirectSettings

pytestmark = pytest.mark.netns

NODE_IP, POD_IP = "10.231.8.1", "10.231.8.2"
KUBELET_UID = 1000
SETTINGS = replace(RedirectSettings(), ipv6=False)


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

    host_text = host_probe_sets_text(ipv6=False)
    host_text += host_probe_ruleset(SETTINGS, kubelet_uid=KUBELET_UID).text()
    if enrolled:
        host_text += f"add element inet istio-ambient-nat istio-inpod-probes-v4 {{ {POD_IP} }}\n"
    run("ip", "netns", "exec", node, "nft", "-f", "-", stdin=host_text)
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
