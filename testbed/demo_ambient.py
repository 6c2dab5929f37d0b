"""Steps 5-8 of the walkthrough: bookinfo in the mesh, a late pod, and out of the mesh again.

Role: functions over a :class:`~testbed.demo_steps.Walkthrough` (its node, printing and
facts): 5 the table says HBONE and ztunnel's listeners are inside productpage's namespace;
6 requests cross the mesh (access log per hop with SPIFFE identities; the veth carries TLS
only); 7 reviews-v4 is enrolled by the CNI plugin before its app's first connection;
8 the label goes, and with it the rules, while traffic keeps flowing, directly.
"""

from __future__ import annotations

import ipaddress
import json
import time
from typing import Any

from cni_plugin import constants as c
from testbed import demo_node as N
from testbed.bookinfo import manifests as M
from testbed.demo_capture import VethCapture, summarise
from testbed.demo_cluster import DemoError, container_facts, is_ready, redirection_annotation
from testbed.demo_cluster import wait_for as _wait
from testbed.demo_steps import (
    NS,
    ZTUNNEL_PORTS,
    Walkthrough,
    command,
    expect_protocol,
    heading,
    note,
    show,
)

REQUESTS = 3


def step5_hbone(w: Walkthrough) -> None:
    heading(
        5,
        "In the mesh: the table shows HBONE for every pod; inside productpage's network "
        "namespace the stand-in listens on 15001/15006/15008/15053 TCP and 15053 UDP",
    )
    names = w.names()
    table = w.agent_table()
    expect_protocol(table, names, "HBONE")
    pid = w.pod_pid("productpage-v1")
    ss = _wait("ztunnel's listeners in productpage-v1", 10,
               lambda: _with_ports(N.listeners(pid), ZTUNNEL_PORTS))  # fmt: skip
    command(f"nsenter --net=/proc/{pid}/ns/net ss -lntu    # productpage-v1's namespace")
    show(ss)
    rules = N.redirection_state(pid, w.backend)
    note(f"redirection installed in the pod by the {w.backend} backend ({len(rules)} entries):")
    show("\n".join(rules), 8)
    if not rules:
        raise DemoError(f"no redirection rules found in productpage-v1 for {w.backend}")
    pods = w.k.pods(NS)
    annotations = {n: redirection_annotation(pods[n]) for n in names}
    if any(v != c.REDIRECTION_ENABLED for v in annotations.values()):
        raise DemoError(f"pods without {c.REDIRECTION_ANNOTATION}=enabled: {annotations}")
    note(f"every pod annotated {c.REDIRECTION_ANNOTATION}={c.REDIRECTION_ENABLED}")
    w.facts["5"] = {
        "table": table,
        "ss": ss,
        "ports": N.listening_ports(ss),
        "rules": rules,
        "annotations": annotations,
    }


def _with_ports(ss: str, want: dict[str, list[int]]) -> str | None:
    got = N.listening_ports(ss)
    return ss if all(set(v) <= set(got[k]) for k, v in want.items()) else None


def _without_ports(ss: str, unwanted: dict[str, list[int]]) -> str | None:
    got = N.listening_ports(ss)
    return ss if not any(set(v) & set(got[k]) for k, v in unwanted.items()) else None


def _captured_requests(w: Walkthrough, count: int) -> tuple[list[str], dict[str, Any], str]:
    """``count`` requests to productpage while capturing on productpage's node-side veth."""
    pid = w.pod_pid("productpage-v1")
    veth = N.node_veth(w.k.info["node_netns"], pid)
    cap = VethCapture(w.k.info["node_netns"], veth)
    try:
        bodies = [w.request() for _ in range(count)]
    finally:
        time.sleep(0.2)  # the last FIN/ACKs
        flows = cap.stop()
    for body in bodies:
        if "details:" not in body or '"reviews":' not in body or "unavailable" in body:
            raise DemoError(f"productpage did not get answers from details and reviews: {body}")
    return bodies, summarise(flows, w.k.info["pod_cidr"], _gateway(w.k.info["pod_cidr"])), veth


def _gateway(cidr: str) -> str:
    return str(next(ipaddress.ip_network(cidr).hosts()))


def _who(w: Walkthrough, addr: str | None) -> str:
    ip = (addr or "").rsplit(":", 1)[0].strip("[]")
    return next((n for n, i in w.ips.items() if i == ip), ip or "?")


def _hop(w: Walkthrough, r: dict[str, Any]) -> str:
    return f"{_who(w, r.get('src.addr'))} -> {_who(w, r.get('dst.addr'))}"


def step6_traffic(w: Walkthrough) -> None:
    heading(6, "Requests to productpage cross the mesh: the stand-in logs every hop with both "
               "SPIFFE identities; the bytes between pods on the wire are TLS")  # fmt: skip
    offset = w.k.access_offset()
    bodies, capture, veth = _captured_requests(w, REQUESTS)
    show(bodies[-1], 4)
    must = {"curl -> productpage-v1", "productpage-v1 -> details-v1"}

    def inbound() -> list[dict[str, Any]] | None:
        recs = [r for r in w.k.access_records(offset) if r.get("direction") == "inbound"]
        hops = {_hop(w, r) for r in recs}
        reviews = any(h.startswith("productpage-v1 -> reviews-") for h in hops)
        return recs if must <= hops and reviews else None

    recs = _wait("access-log lines for every hop", 10, inbound,
                 f"See {w.k.access_log} and {w.k.log_path('ztunnel-standin')}.")  # fmt: skip
    every = w.k.access_records(offset)
    note(f"the stand-in's access log {w.k.access_log}: {len(every)} lines; below, the "
         "receiving side of each hop (the sending side logs it again as outbound)")  # fmt: skip
    show("\n".join(
        f"{_hop(w, r):32} {r.get('direction')}  src.identity={r.get('src.identity')}  "
        f"dst.identity={r.get('dst.identity')}  bytes={r.get('bytes_sent')}/"
        f"{r.get('bytes_recv')}  duration={r.get('duration')}" for r in recs), 12)  # fmt: skip
    note("one of them as the stand-in wrote it:")
    show(json.dumps(recs[0]), 3)
    bad = [r for r in recs if not (_spiffe(r, "src") and _spiffe(r, "dst"))]
    if bad:
        raise DemoError(f"access-log lines without both SPIFFE identities: {bad[:2]}")
    _show_capture(veth, capture)
    if (
        not capture["streams"]
        or capture["plaintext_streams"]
        or capture["tls_bytes"] != capture["bytes"]
    ):
        raise DemoError(f"bytes between pods on {veth} are not all TLS: {capture['streams'][:3]}")
    w.facts["6"] = {"responses": bodies, "access": every, "capture": capture, "veth": veth}


def _spiffe(rec: dict[str, Any], side: str) -> bool:
    return str(rec.get(f"{side}.identity")).startswith("spiffe://")


def _show_capture(veth: str, cap: dict[str, Any]) -> None:
    kinds = sorted({k for s in cap["streams"] for k in s["tls_records"]})
    note(f"capture on {veth} (productpage-v1's veth on the node): {len(cap['streams'])} streams "
         f"between pods, {cap['bytes']} bytes, ports {cap['ports']}")  # fmt: skip
    note(f"  inside TLS records: {cap['tls_bytes']} bytes ({', '.join(kinds) or 'none'}); "
         f"streams showing plaintext HTTP: {cap['plaintext_streams']}")  # fmt: skip
    for s in cap["streams"][:3]:
        plain = ", ".join(s["plaintext_markers"])
        note(
            f"  {s['flow']:44} first bytes {s['first_bytes']}"
            + (f"  plaintext: {plain}" if plain else "")
        )


def step7_late_pod(w: Walkthrough) -> None:
    heading(
        7,
        "A pod added now (reviews-v4) is enrolled by the CNI plugin while its sandbox is "
        "made, before its app starts: even its first connection is in the mesh",
    )
    late = M.LATE
    image = w.k.info["images"]["busybox"]
    offset = w.k.access_offset()
    env = M.upstream_env(late, w.ips)
    spec = M.pod(late, image, env)
    command(f"kubectl apply -f -    # reviews-v4; its app first fetches {env['STARTUP_CALL']}")
    w.kubectl("apply", "-f", "-", stdin=json.dumps(M.as_list([spec])), echo=False)
    first_running: dict[str, Any] | None = None
    deadline = time.monotonic() + 60
    while True:
        pod = w.k.pod(NS, late.name)
        if pod is not None:
            if first_running is None and container_facts(pod)["started_at"]:
                first_running = {"annotation": redirection_annotation(pod), "at": time.time()}
            if is_ready(pod):
                break
        if time.monotonic() > deadline:
            raise DemoError(
                f"{late.name} not Ready after 60s; see {w.bed.layout.logs_dir}/kubelet.log"
            )
        time.sleep(0.1)
    at_ready = redirection_annotation(pod)
    w.ips[late.name] = pod["status"]["podIP"]
    note(f"annotation {c.REDIRECTION_ANNOTATION} when first seen running: "
         f"{(first_running or {}).get('annotation')}; at first Ready: {at_ready}")  # fmt: skip
    agent_lines = [r for r in w.k.log_records("istio-cni-agent") if _pod_name(r) == late.name]
    note(f"{late.name} in the agent's log {w.k.log_path('istio-cni-agent')} (the plugin's "
         "own lines are forwarded there):")  # fmt: skip
    show("\n".join(f"{r.get('time')} {r.get('scope') or r.get('logger')}: {r.get('msg')}"
                   for r in agent_lines), 8)  # fmt: skip
    msgs = [r.get("msg") for r in agent_lines]
    if "plugin asked to enroll pod" not in msgs or "pod enrolled" not in msgs:
        raise DemoError(
            f"the agent log does not show {late.name} enrolled via the CNI plugin: {msgs}"
        )
    logs = w.kubectl("logs", "-n", NS, late.name)
    show(logs, 4)
    first = [r for r in w.k.access_records(offset) if _who(w, r.get("src.addr")) == late.name]
    note("its first connection, in the stand-in's access log:")
    show("\n".join(f"{_hop(w, r)} {r.get('direction')} src.identity={r.get('src.identity')} "
                   f"dst.identity={r.get('dst.identity')}" for r in first[:2]))  # fmt: skip
    if at_ready != c.REDIRECTION_ENABLED or "first connection: GET" not in logs or "->" not in logs:
        raise DemoError(f"{late.name}: annotation at Ready {at_ready!r}, app log {logs!r}")
    if not first:
        raise DemoError(
            f"{late.name}'s first connection is not in the access log: it was not captured"
        )
    w.facts["7"] = {
        "annotation_first_running": (first_running or {}).get("annotation"),
        "annotation_at_ready": at_ready,
        "agent_log": agent_lines,
        "app_log": logs,
        "access": first,
        "state": w.k.agent_pods(NS).get(late.name),
        "container": container_facts(pod),
    }


def _pod_name(rec: dict[str, Any]) -> str | None:
    """The pod of an agent log record: ``{"namespace", "name"}`` from the agent itself,
    ``"ns/name"`` on the lines the plugin forwards to it."""
    pod = rec.get("pod")
    if isinstance(pod, dict):
        return str(pod.get("name"))
    return pod.rpartition("/")[2] if isinstance(pod, str) else None


def step8_unlabel(w: Walkthrough) -> None:
    heading(8, "The label is removed: TCP again, the redirection gone from the pods, and "
               "traffic still flows, directly")  # fmt: skip
    names = w.names()
    w.kubectl("label", "namespace", NS, f"{c.DATAPLANE_MODE_LABEL}-")
    w.wait_agent("TCP (not enrolled)", lambda p: p.get("state") != "enabled", names)
    table = w.agent_table()
    expect_protocol(table, names, "TCP")
    pid = w.pod_pid("productpage-v1")
    ss = _wait("the stand-in's listeners gone from productpage-v1", 10,
               lambda: _without_ports(N.listeners(pid), ZTUNNEL_PORTS))  # fmt: skip
    # The agent keeps a NAT hold (nft table istio-cni-nat-hold) until ztunnel has drained the
    # pod's redirected connections (node_agent/nat_hold.py): wait for it to go too.
    deadline = time.monotonic() + 20
    while (rules := N.redirection_state(pid, w.backend)) and time.monotonic() < deadline:
        time.sleep(0.5)
    note(f"redirection entries left in productpage-v1: {len(rules)}; ztunnel listeners: none")
    if rules:
        raise DemoError(f"redirection left in productpage-v1 after unlabel: {rules}")
    offset = w.k.access_offset()
    bodies, capture, veth = _captured_requests(w, 1)
    show(bodies[-1], 2)
    time.sleep(0.5)
    through = w.k.access_records(offset)
    note(f"new access-log lines: {len(through)} (nothing goes through the stand-in)")
    _show_capture(veth, capture)
    if through or not capture["plaintext_streams"]:
        raise DemoError(f"traffic after unlabel is not direct plaintext: {len(through)} log lines")
    pods = w.k.pods(NS)
    w.facts["8"] = {
        "table": table,
        "rules": rules,
        "ss": ss,
        "responses": bodies,
        "capture": capture,
        "access": through,
        "annotations": {n: redirection_annotation(pods[n]) for n in names if n in pods},
    }


AMBIENT_STEPS = (step5_hbone, step6_traffic, step7_late_pod, step8_unlabel)
