"""``make demo`` end to end, per backend: the walkthrough runs, and each step's facts hold.

The demo runs as users run it (``python -m testbed.demo --backend X``, a subprocess, its
own testbed instance so a node of this session is not disturbed) and writes its evidence
(raw command outputs, access-log lines, capture summaries, pod snapshots) with
``--facts``. This test re-derives every claim from that evidence instead of trusting the
demo's own verdicts, and checks the host by itself afterwards.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from testbed.layout import Layout

pytestmark = [pytest.mark.testbed, pytest.mark.timeout(900)]
NEEDS_AGENT_IMAGE = True  # built before the first test (testbed.pytest_plugin.prebuild)

REPO = Path(__file__).resolve().parents[2]
BOOKINFO = ["details-v1", "ratings-v1", "reviews-v1", "reviews-v2", "reviews-v3", "productpage-v1"]
PODS = [*BOOKINFO, "curl"]
ZTUNNEL_TCP, ZTUNNEL_UDP = {15001, 15006, 15008, 15053}, {15053}
SPIFFE = "spiffe://cluster.local/ns/bookinfo/sa/"


def host_rules() -> dict[str, str]:
    out = {}
    for argv in (["iptables-save"], ["iptables-legacy-save"], ["nft", "list", "ruleset"]):
        text = subprocess.run(argv, capture_output=True, text=True).stdout
        lines = [ln for ln in text.splitlines() if not ln.startswith("#")]
        out[argv[0]] = "\n".join(re.sub(r"\[\d+:\d+\]", "", ln) for ln in lines)
    return out


def protocols(table: str) -> dict[str, str]:
    # `pods -n NS` prints no NAMESPACE column (kubectl's habit): POD NAME comes first.
    rows = [ln.split() for ln in table.splitlines()]
    assert rows and rows[0][:3] == ["POD", "NAME", "ADDRESS"], table
    return {r[0]: r[3] for r in rows[1:] if len(r) >= 4}


def ports(ss: str) -> dict[str, set[int]]:
    got: dict[str, set[int]] = {"tcp": set(), "udp": set()}
    for line in ss.splitlines()[1:]:
        cols = line.split()
        if cols and cols[0] in got:
            got[cols[0]].add(int(cols[4].rsplit(":", 1)[1]))
    return got


def run_demo(backend: str, tmp_path: Path) -> tuple[dict[str, Any], str, float, str]:
    instance = f"dt{os.getpid()}"
    facts_file = tmp_path / "facts.json"
    env = {**os.environ, "ISTIO_CNI_TESTBED_INSTANCE": instance, "PYTHONPATH": str(REPO)}
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "testbed.demo", "--backend", backend, "--facts", str(facts_file),
         "--keep-logs", str(tmp_path / "logs")],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=800,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    print(proc.stdout[-6000:])
    assert proc.returncode == 0, f"demo failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-3000:]}"
    return json.loads(facts_file.read_text()), proc.stdout, elapsed, instance


@pytest.mark.parametrize("backend", ["iptables", "nftables", "ebpf"])
def test_demo_walkthrough_facts(backend: str, tmp_path: Path) -> None:
    rules_before = host_rules()
    facts, out, elapsed, instance = run_demo(backend, tmp_path)
    print(f"demo with {backend}: {elapsed:.1f}s wall, demo says {facts['summary']['seconds']}s")

    # Every step printed its heading, in order.
    heads = [int(m) for m in re.findall(r"^== (\d)/9 ", out, re.M)]
    assert heads == list(range(1, 10)), heads

    # 1: our installer chained our plugin after bridge; agent on this backend; stand-in in.
    f1 = facts["1"]
    assert f1["chain"][0] == "bridge" and f1["chain"][-1] == "istio-cni", f1["chain"]
    assert f1["agent_backend"] == backend and f1["ztunnel_connected"] is True
    # ... by the chart's DaemonSet pod, from our image, in the node's network namespace; the
    # only process of ours on the node is the ztunnel stand-in; every agent process on the
    # machine sees the image's root filesystem, not the host's.
    assert f1["agent_pod"]["image"] == f1["image"] and f1["agent_pod"]["host_network"] is True
    assert f1["helm_values"]["profile"] == "ambient"
    assert set(f1["mesh_pids"]) == {"ztunnel-standin"}, f1["mesh_pids"]
    assert f1["agent_processes"], "no istio-cni-agent process found"
    assert not any(p["host_root"] for p in f1["agent_processes"]), f1["agent_processes"]

    # 2: the pods, one service account per app, probes, and the app answering end to end.
    pods = facts["2"]["pods"]
    assert set(pods) == set(PODS)
    for name in BOOKINFO:
        app = name.rsplit("-", 1)[0]
        assert pods[name]["service_account"] == f"bookinfo-{app}", name
        assert pods[name]["ready"] and pods[name]["probe"]["httpGet"]["path"] == "/health"
    body = facts["2"]["response"]
    assert "William Shakespeare" in body and '"reviews":[' in body
    ip_of = {n: p["ip"] for n, p in pods.items()}
    name_of = {ip: n for n, ip in ip_of.items()}

    # 3: TCP for all, before the label.
    assert protocols(facts["3"]["table"]) == dict.fromkeys(PODS, "TCP")

    # 4: the label restarted nothing and no probe failed.
    f4 = facts["4"]
    assert f4["before"] == f4["after"] and set(f4["before"]) == set(PODS)
    assert all(v["restarts"] == 0 and v["started_at"] for v in f4["after"].values())
    assert f4["unready"] == [] and f4["samples"] >= 5

    # 5: HBONE for all; ztunnel's listeners inside productpage; rules; annotations.
    f5 = facts["5"]
    assert protocols(f5["table"]) == dict.fromkeys(PODS, "HBONE")
    got = ports(f5["ss"])
    assert got["tcp"] >= ZTUNNEL_TCP and got["udp"] >= ZTUNNEL_UDP and 9080 in got["tcp"]
    assert f5["rules"], "no redirection found in productpage's namespace"
    assert set(f5["annotations"].values()) == {"enabled"}

    # 6: responses; one inbound access-log line per hop with both SPIFFE ids; TLS only.
    f6 = facts["6"]
    assert len(f6["responses"]) == 3 and all("William Shakespeare" in r for r in f6["responses"])
    hops: dict[str, list[dict[str, Any]]] = {}
    for rec in f6["access"]:
        src = name_of.get(rec["src.addr"].rsplit(":", 1)[0])
        dst = name_of.get(rec["dst.addr"].rsplit(":", 1)[0])
        assert src and dst, rec
        assert rec["src.identity"] == SPIFFE + pods[src]["service_account"], rec
        assert rec["dst.identity"] == SPIFFE + pods[dst]["service_account"], rec
        assert rec["direction"] in ("inbound", "outbound") and rec["duration"].endswith("ms")
        assert rec["bytes_sent"] > 0 and rec["bytes_recv"] > 0, rec
        if rec["direction"] == "inbound":
            hops.setdefault(f"{src}>{dst}", []).append(rec)
    assert len(hops["curl>productpage-v1"]) == 3
    assert len(hops["productpage-v1>details-v1"]) == 3
    assert sum(len(v) for k, v in hops.items() if k.startswith("productpage-v1>reviews-")) == 3
    assert set(hops) <= {"curl>productpage-v1", "productpage-v1>details-v1",
                         "productpage-v1>reviews-v1", "productpage-v1>reviews-v2",
                         "productpage-v1>reviews-v3", "reviews-v2>ratings-v1",
                         "reviews-v3>ratings-v1"}, set(hops)  # fmt: skip
    cap = f6["capture"]
    assert cap["streams"] and cap["ports"] == [15008], cap["ports"]
    for s in cap["streams"]:
        assert s["all_tls"] and not s["plaintext_markers"], s
        assert s["first_bytes"].startswith("16 03"), s  # every stream opens with a handshake
    assert cap["bytes"] > 2000

    # 7: reviews-v4 enrolled through the plugin, annotated before Ready, first call captured.
    f7 = facts["7"]
    msgs = [r["msg"] for r in f7["agent_log"]]
    assert "plugin asked to enroll pod" in msgs and "pod enrolled" in msgs
    assert msgs.index("plugin asked to enroll pod") < msgs.index("pod enrolled")
    # ... and the plugin's own line (forwarded to the agent's log) says the agent took it.
    assert any(r.get("scope") == "cni-plugin" for r in f7["agent_log"]), f7["agent_log"]
    assert f7["annotation_at_ready"] == "enabled"
    assert f7["annotation_first_running"] == "enabled"
    assert "first connection: GET" in f7["app_log"] and '"Reviewer1":5' in f7["app_log"]
    v4_ip = f7["state"]["ips"][0]
    first = [r for r in f7["access"] if r["src.addr"].startswith(v4_ip + ":")]
    assert first and all(r["dst.addr"].startswith(ip_of["ratings-v1"] + ":") for r in first)
    assert {r["src.identity"] for r in first} == {SPIFFE + "bookinfo-reviews"}

    # 8: unlabelled: TCP, no rules, no listeners, direct plaintext, nothing via the stand-in.
    f8 = facts["8"]
    assert protocols(f8["table"]) == dict.fromkeys([*PODS, "reviews-v4"], "TCP")
    assert f8["rules"] == []
    assert not (ZTUNNEL_TCP & ports(f8["ss"])["tcp"]) and 9080 in ports(f8["ss"])["tcp"]
    assert f8["access"] == [] and "William Shakespeare" in f8["responses"][0]
    assert f8["capture"]["ports"] == [9080] and f8["capture"]["plaintext_streams"] > 0
    assert set(f8["annotations"].values()) == {None}

    # Prometheus (Debian's) found the pod by its annotations and answers PromQL with the
    # agent's own series: installed, informer events seen, the plugin's requests counted.
    answers = facts["metrics"]["answers"]
    assert answers["istio_cni_install_ready"][0]["value"][1] == "1"
    assert answers["istio_cni_install_ready"][0]["metric"]["pod"].startswith("istio-cni-node-")
    assert sum(float(r["value"][1]) for r in
               answers["sum by (type) (nodeagent_reconcile_events_total)"]) > 0  # fmt: skip
    plugin = answers["sum by (response_code) (istio_cni_plugin_requests_total)"]
    assert sum(float(r["value"][1]) for r in plugin) >= 1, plugin  # reviews-v4's ADD at least

    # 9: nothing left, by the demo's account and by this test's own look.
    f9 = facts["9"]
    # helm uninstall: the pod's cleanup left the node's files, rules, sets, pins as before
    assert f9["uninstall"]["differences"] == {} and f9["uninstall"]["seconds"] > 0, f9
    assert f9["down_problems"] == [] and not any(f9["leftovers"].values()), f9
    lay = Layout.for_instance(instance)
    assert lay.node_name not in subprocess.run(["ip", "netns"], capture_output=True,
                                               text=True).stdout  # fmt: skip
    assert not lay.state_dir.exists()
    assert not lay.bpf_pin_root.exists()  # ebpf: the instance's pins, getsockopt link included
    assert not any(d.exists() for d in lay.cgroup_dirs())
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(lay.state_dir) not in ps and lay.node_name not in ps
    assert host_rules() == rules_before
    assert facts["summary"]["rc"] == 0 and facts["summary"]["clean"] is True


def test_ctrl_c_mid_walkthrough_still_tears_everything_down(tmp_path: Path) -> None:
    """SIGINT (Ctrl-C) once bookinfo runs: the demo stops, runs step 9, exits 130, and the
    node, its namespaces, cgroups, files and processes are gone."""
    instance = f"di{os.getpid()}"
    env = {**os.environ, "ISTIO_CNI_TESTBED_INSTANCE": instance, "PYTHONPATH": str(REPO)}
    rules_before = host_rules()
    proc = subprocess.Popen(
        [sys.executable, "-u", "-m", "testbed.demo"], stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True, env=env, cwd=REPO,
    )  # fmt: skip
    assert proc.stdout is not None
    seen: list[str] = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("== 3/9"):
                proc.send_signal(signal.SIGINT)
                break
        rest, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:  # never leave it running, whatever failed above
            proc.kill()
            proc.wait()
    out = "".join(seen) + rest
    print(out[-3000:])
    assert any(ln.startswith("== 3/9") for ln in seen), out
    assert proc.returncode == 130, out
    assert "DEMO FAILED: interrupted (SIGINT)" in out and "== 9/9" in out
    assert "processes of the demo still running: none" in out
    lay = Layout.for_instance(instance)
    assert lay.node_name not in subprocess.run(["ip", "netns"], capture_output=True,
                                               text=True).stdout  # fmt: skip
    assert not lay.state_dir.exists() and not any(d.exists() for d in lay.cgroup_dirs())
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(lay.state_dir) not in ps and lay.node_name not in ps
    assert host_rules() == rules_before
