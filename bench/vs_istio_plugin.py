"""Plugin ADD for a pod not in the mesh, ours vs Istio's ``istio-cni``, one interleaved run.

``python -m bench.vs_istio_plugin [--runs 200] [--chart PATH] [--json OUT]`` as root, after
``make plugin``; Istio's plugin is built by :mod:`bench.istio_peer`. Against the real
testbed API server (reused when up, else brought up and down here) holding one running
light pod (:mod:`bench.agent_light_pods`) in a namespace without the ambient label. Both
plugins are spawned inside the node's network namespace, as the runtime spawns them. Each
exec is a fresh process with the same CNI environment and a stdin config differing only in
``cni_agent_run_dir``, timed from spawn to exit with its CPU time (``wait4``). The two
plugins alternate, 3 warm-up rounds unrecorded. Each asks what its design asks:
- **Istio's**: reads ``<run dir>/istio-cni-kubeconfig`` (here the testbed's in-node admin
  kubeconfig, a bearer token over TLS as Istio's own is) and GETs the pod and its namespace
  (``isAmbientPod``), then the pod again (``getK8sPodInfo``: no ``istio-proxy`` container,
  so it passes the pod through);
- **ours**: asks our node agent (a real ``istio-cni-agent run`` process for this node, on
  the same API server, a recording ZDS peer as ztunnel) over its unix socket, and passes
  the pod through on its answer.
The server side's CPU (kube-apiserver for Istio's, our agent for ours) is reported too, as
the growth of that process's CPU time over the run divided by the execs (both run
interleaved, so each includes the other's idle background work).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.agent_enroll import _cpu_s, start_agent
from bench.agent_light_pods import LightNode, wait_until
from bench.chart import Bar, draw
from bench.istio_peer import DEFAULT_VERSION, PeerBuildError, ensure_peer
from bench.plugin_startup import run_once, summary
from cni_plugin.netns import run_in_netns
from tests.zds_recorder import ZdsRecorder

ROOT = Path(__file__).resolve().parents[1]
ISTIO, OURS = "Istio istio-cni", "ours build/istio-cni"
ISTIO_SKIP_LOG = "excluded because it does not have istio-proxy container"


def cni_stdin(run_dir: Path, netns: str, ip: str) -> bytes:
    """The chained config both plugins get (Istio's chart defaults; the agent dir differs)."""
    return json.dumps(
        {
            "cniVersion": "1.0.0",
            "name": "k8s-pod-network",
            "type": "istio-cni",
            "ambient_enabled": True,
            "exclude_namespaces": ["kube-system"],
            "cni_agent_run_dir": str(run_dir),
            "pod_namespace": "istio-system",
            "plugin_log_level": "info",
            "prevResult": {
                "cniVersion": "1.0.0",
                "interfaces": [{"name": "eth0", "sandbox": netns}],
                "ips": [{"address": f"{ip}/24", "interface": 0}],
                "dns": {},
            },
        }
    ).encode()


def cni_env(netns: str, namespace: str, name: str, uid: str) -> dict[str, str]:
    return {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "benchvsistio0123",
        "CNI_NETNS": netns,
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/opt/cni/bin",
        "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};"
        f"K8S_POD_INFRA_CONTAINER_ID=benchvsistio0123;K8S_POD_UID={uid}",
    }


def run(runs: int, version: str, bed_info: dict[str, Any], core: Any) -> dict[str, Any]:
    ours_exe = ROOT / "build" / "istio-cni"
    if not ours_exe.exists():
        raise PeerBuildError(f"{ours_exe} is missing: run `make plugin` first")
    peer = ensure_peer(version)
    ln = LightNode(core)
    tmp = Path(f"/var/tmp/icnia-vsplug-{ln.tag}")
    (tmp / "istio-run").mkdir(parents=True)
    shutil.copy(bed_info["kubeconfig_node"], tmp / "istio-run" / "istio-cni-kubeconfig")
    node_ns = f"icnia-vsnode-{ln.tag}"
    subprocess.run(["ip", "netns", "add", node_ns], check=True)
    agent: subprocess.Popen[bytes] | None = None
    rec = ZdsRecorder(str(tmp / "zt" / "ztunnel.sock"))
    try:
        ln.create_node()
        ns = f"icnia-vsplug-{ln.tag}"
        ln.create_namespace(ns)  # no dataplane-mode label: the pod is not in the mesh
        pod = ln.add_pod(ns, "app-1")
        agent = start_agent(tmp, ln.node_name, bed_info["kubeconfig"], node_ns, 4, "iptables", "")
        rec.start()
        wait_until(lambda: rec.of("snapshot_sent"), 60, "our agent ready")
        env = cni_env(pod.netns, ns, pod.name, pod.uid)
        cases = {
            ISTIO: ([str(peer.path("istio-cni"))], cni_stdin(tmp / "istio-run", pod.netns, pod.ip)),
            OURS: ([str(ours_exe)], cni_stdin(tmp / "run", pod.netns, pod.ip)),
        }
        wall: dict[str, list[float]] = {k: [] for k in cases}
        cpu: dict[str, list[float]] = {k: [] for k in cases}
        apiserver = int(bed_info["pids"]["kube-apiserver"])

        def loop() -> None:
            for i in range(runs + 3):
                order = list(cases) if i % 2 == 0 else list(reversed(cases))
                for key in order:
                    argv, stdin = cases[key]
                    w, c, rc = run_once(argv, env, stdin)
                    if rc != 0:
                        raise RuntimeError(f"{key} exited {rc} (logs under {tmp})")
                    if i >= 3:
                        wall[key].append(w)
                        cpu[key].append(c)

        load = os.getloadavg()
        server0 = {ISTIO: _cpu_s(apiserver)[0], OURS: _cpu_s(agent.pid)[0]}
        started = time.time()
        # The plugins run where a runtime runs them: in the node's network namespace (the
        # spawning thread enters it and then dies), so Istio's reaches the API server
        # directly, not through the testbed's host-side forwarder.
        run_in_netns(bed_info["node_netns"], loop)
        server1 = {ISTIO: _cpu_s(apiserver)[0], OURS: _cpu_s(agent.pid)[0]}
        istio_log = (tmp / "istio-run" / "istio-cni.log").read_text(errors="replace")
        if istio_log.count(ISTIO_SKIP_LOG) < runs:
            raise RuntimeError(f"Istio's plugin did not judge the pod each time ({tmp})")
        annotations = ln.annotations(ns)
        if any(annotations.values()):
            raise RuntimeError(f"a pod outside the mesh was annotated: {annotations}")
    finally:
        if agent is not None:
            agent.terminate()
            agent.wait(timeout=30)
        rec.stop()
        problems = ln.cleanup()
        subprocess.run(["ip", "netns", "del", node_ns], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    out: dict[str, Any] = {
        "istio_version": peer.version,
        "runs": runs,
        "load_at_start": [round(x, 2) for x in load],
        "seconds": round(time.time() - started, 1),
        "kubernetes": bed_info.get("kubernetes_version"),
        "cleanup_problems": problems,
        "ms": wall,
        "cpu_ms": cpu,
    }
    for key in cases:
        out[key] = summary(wall[key], cpu[key])
        out[key]["server_cpu_ms_per_exec"] = (server1[key] - server0[key]) * 1000 / runs
    return out


def report(res: dict[str, Any], chart: Path | None) -> str:
    i, o = res[ISTIO], res[OURS]
    rows = [
        f"| plugin ADD, pod not in the mesh, {res['runs']} execs each | median ms | p99 ms "
        "| CPU ms per exec (median) | server CPU ms per exec |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, s in ((ISTIO, i), (OURS, o)):
        rows.append(
            f"| {name} | {s['median_ms']:.2f} | {s['p99_ms']:.2f} "
            f"| {s['cpu_median_ms']:.2f} | {s['server_cpu_ms_per_exec']:.2f} |"
        )
    rows.append(
        f"| **ours / Istio's** | **{o['median_ms'] / i['median_ms']:.2f}x** "
        f"| **{o['p99_ms'] / i['p99_ms']:.2f}x** "
        f"| **{o['cpu_median_ms'] / i['cpu_median_ms']:.2f}x** "
        f"| {o['server_cpu_ms_per_exec'] / max(i['server_cpu_ms_per_exec'], 1e-9):.2f}x |"
    )
    if chart is not None:
        wall_x = o["median_ms"] / i["median_ms"]
        cpu_x = o["cpu_median_ms"] / i["cpu_median_ms"]
        bars = [
            Bar(f"{ISTIO}, wall", i["median_ms"], i["p99_ms"], True, 1.0),
            Bar(f"{OURS}, wall", o["median_ms"], o["p99_ms"], False, wall_x),
            Bar(f"{ISTIO}, CPU", i["cpu_median_ms"], i["cpu_median_ms"], True, 1.0),
            Bar(f"{OURS}, CPU", o["cpu_median_ms"], o["cpu_median_ms"], False, cpu_x),
        ]
        draw(
            chart,
            "Plugin ADD, pod not in the mesh: exec to exit, median (whisker p99)",
            "ms per exec (lower is better)",
            bars,
            note=f"istio.io/istio {res['istio_version']}; {res['runs']} execs each, "
            f"interleaved; load at start {res['load_at_start'][0]}",
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--istio-version", default=DEFAULT_VERSION)
    p.add_argument("--chart", type=Path)
    p.add_argument("--json", type=Path)
    p.add_argument("--instance", default="vsistio", help="testbed instance to use or bring up")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.vs_istio_plugin: run as root", file=sys.stderr)
        return 2
    from kubernetes import client

    from testbed.layout import Layout
    from testbed.node import Testbed

    bed = Testbed(Layout.for_instance(args.instance))
    brought_up = not bed.status().get("running")
    try:
        info = bed.up() if brought_up else bed.info()
        core = client.CoreV1Api(bed.kube_client())
        res = run(args.runs, args.istio_version, info, core)
    except PeerBuildError as e:
        print(f"bench.vs_istio_plugin: {e}", file=sys.stderr)
        return 1
    finally:
        if brought_up:
            bed.down()
    print(f"istio.io/istio {res['istio_version']}; kubernetes {res['kubernetes']}; load "
          f"average at start {res['load_at_start']}; {res['seconds']} s\n")  # fmt: skip
    print(report(res, args.chart))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
