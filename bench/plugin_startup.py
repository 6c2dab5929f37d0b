"""Plugin ADD latency for a non-ambient pod, per executable form, against two floors.

``python -m bench.plugin_startup [--runs N] [--json OUT]`` (build the forms first:
``make plugin-forms``). Every run is a fresh exec with a CNI environment and stdin, timed
from spawn to exit, as a container runtime sees it, plus its CPU time (user + sys from
``wait4``, which a busy machine inflates far less than wall time). Candidates run round-robin
so drift hits all alike. Floors: ``python3 -I -S -c pass`` (the bare interpreter start) and a
trivial static C program. Two non-ambient cases:
- ``skip``: a pod in an excluded namespace (no I/O at all, the common kube-system case);
- ``agent``: ambient enabled, the agent (the real :class:`PluginEventServer` over its unix
  socket, with a pod cache that says "not ambient") is asked and the pod passed through.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.join(ROOT, "build")
SYSTEM_PYTHON = "/usr/bin/python3"

FORMS: dict[str, list[str]] = {
    "bundled-cpython (shipped)": [
        os.path.join(BUILD, "istio-cni.bundled-cpython.d", "istio-cni")
    ],
    "nuitka-onefile": [os.path.join(BUILD, "istio-cni.nuitka-onefile")],
    "nuitka-standalone": [os.path.join(BUILD, "istio-cni.nuitka-standalone.d", "istio-cni")],
    "pyinstaller-onefile": [os.path.join(BUILD, "istio-cni.pyinstaller-onefile")],
    "pyinstaller-onedir": [os.path.join(BUILD, "istio-cni.pyinstaller-onedir.d", "istio-cni")],
    "zipapp (needs python3)": [os.path.join(BUILD, "istio-cni.zipapp")],
    "source, python3 -I -S (needs python3)": [
        SYSTEM_PYTHON, "-I", "-S", "-c",
        f"import sys; sys.path.insert(0, {ROOT!r}); from cni_plugin.plugin import main; main()",
    ],
}  # fmt: skip


def static_true() -> list[str]:
    path = os.path.join(BUILD, "bench-true")
    if not os.path.exists(path):
        os.makedirs(BUILD, exist_ok=True)
        src = os.path.join(BUILD, "bench-true.c")
        with open(src, "w") as f:
            f.write("int main(void) { return 0; }\n")
        subprocess.run(["gcc", "-static", "-O2", "-o", path, src], check=True)
    return [path]


def run_once(cmd: Sequence[str], env: dict[str, str], stdin: bytes) -> tuple[float, float, int]:
    """(wall ms, CPU ms = user + sys of the child, exit status) of one exec."""
    r_in, w_in = os.pipe()
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        t0 = time.perf_counter()
        pid = os.posix_spawn(
            cmd[0], list(cmd), env,
            file_actions=[(os.POSIX_SPAWN_DUP2, r_in, 0), (os.POSIX_SPAWN_DUP2, devnull, 1),
                          (os.POSIX_SPAWN_DUP2, devnull, 2)],
        )  # fmt: skip
        os.close(r_in)
        r_in = -1
        os.write(w_in, stdin)
        os.close(w_in)
        w_in = -1
        _, status, usage = os.wait4(pid, 0)
        wall = (time.perf_counter() - t0) * 1000
    finally:
        for fd in (r_in, w_in):
            if fd >= 0:
                os.close(fd)
        os.close(devnull)
    return wall, (usage.ru_utime + usage.ru_stime) * 1000, os.waitstatus_to_exitcode(status)


def summary(wall: list[float], cpu: list[float]) -> dict[str, float]:
    s = sorted(wall)
    return {
        "median_ms": statistics.median(s),
        "p99_ms": s[min(len(s) - 1, int(len(s) * 0.99))],
        "cpu_median_ms": statistics.median(cpu),
    }


def cni_env(run_dir: str, ns: str) -> dict[str, str]:
    return {
        "PATH": "/nonexistent",  # no python on PATH: the frozen forms must not need one
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "bench0123456789",
        "CNI_NETNS": "/var/run/netns/cni-bench",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/opt/cni/bin",
        "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME=app-1;"
        "K8S_POD_INFRA_CONTAINER_ID=bench0123456789;K8S_POD_UID=u-1",
    }


def stdin_for(run_dir: str) -> bytes:
    return json.dumps(
        {
            "cniVersion": "1.0.0",
            "name": "k8s-pod-network",
            "type": "istio-cni",
            "ambient_enabled": True,
            "exclude_namespaces": ["kube-system"],
            "cni_agent_run_dir": run_dir,
            "pod_namespace": "istio-cni",
            "plugin_log_level": "info",
            "prevResult": {
                "cniVersion": "1.0.0",
                "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/cni-bench"}],
                "ips": [{"address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 0}],
                "dns": {},
            },
        }
    ).encode()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--json", help="write results here")
    args = p.parse_args(argv)

    from node_agent.plugin_events import PluginEventServer

    run_dir = tempfile.mkdtemp(prefix="icnit-bench-")
    server = PluginEventServer(
        os.path.join(run_dir, "pluginevent.sock"),
        on_add=lambda event: "not enrolled",
        pod_status=lambda ns, name: {"known": True, "ambient": False, "reason": "not labelled"},
    )
    server.start()
    results: dict[str, Any] = {"runs": args.runs, "forms": {}}
    try:
        stdin = stdin_for(run_dir)
        env0 = {"PATH": "/nonexistent"}
        # Every candidate once per round, rounds repeated: machine drift hits all alike.
        cases: dict[tuple[str, str], tuple[list[str], dict[str, str], bytes]] = {
            ("python3 -I -S -c pass", ""): ([SYSTEM_PYTHON, "-I", "-S", "-c", "pass"], env0, b""),
            ("static C", ""): (static_true(), env0, b""),
        }
        for form, cmd in FORMS.items():
            if not os.path.exists(cmd[0]):
                print(f"skip {form}: {cmd[0]} not built (make plugin-forms)", file=sys.stderr)
                continue
            for case, ns in (("skip", "kube-system"), ("agent", "demo")):
                cases[(form, case)] = (cmd, cni_env(run_dir, ns), stdin)
        wall: dict[tuple[str, str], list[float]] = {k: [] for k in cases}
        cpu: dict[tuple[str, str], list[float]] = {k: [] for k in cases}
        for i in range(args.runs + 3):
            for key, (cmd, env, data) in cases.items():
                w, c, rc = run_once(cmd, env, data)
                if rc != 0:
                    raise RuntimeError(f"{key} exited {rc}")
                if i >= 3:  # the first rounds warm caches (and the onefile unpack)
                    wall[key].append(w)
                    cpu[key].append(c)
        floor_py = summary(wall[("python3 -I -S -c pass", "")], cpu[("python3 -I -S -c pass", "")])
        floor_c = summary(wall[("static C", "")], cpu[("static C", "")])
        results["python3 -I -S -c pass"] = floor_py
        results["static C"] = floor_c
        for (form, case), samples in wall.items():
            if not case:
                continue
            row = results["forms"].setdefault(form, {})
            exe = FORMS[form][0]
            if exe != SYSTEM_PYTHON and "size_bytes" not in row:
                row["size_bytes"] = (
                    sum(os.path.getsize(os.path.join(d, f))
                        for d, _, fs in os.walk(os.path.dirname(exe)) for f in fs)
                    if exe.endswith(".d/istio-cni") else os.path.getsize(exe)
                )  # fmt: skip
            s = summary(samples, cpu[(form, case)])
            s["x_python"] = s["median_ms"] / floor_py["median_ms"]
            s["x_static_c"] = s["median_ms"] / floor_c["median_ms"]
            s["cpu_x_python"] = s["cpu_median_ms"] / floor_py["cpu_median_ms"]
            row[case] = s
    finally:
        server.stop()
        os.rmdir(run_dir)
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
