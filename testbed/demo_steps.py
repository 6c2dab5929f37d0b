"""Steps 1-8 of the ambient walkthrough on the testbed node (step 9, teardown, is in
:mod:`testbed.demo`, which always runs it).

Role: :class:`Walkthrough` performs each step the way an operator would (``kubectl``,
``istio-cni-agent pods``, ``ss`` in a pod's namespace, a capture on a veth), prints a short
heading saying what the reader is looking at, checks the step's facts and records the
evidence in ``facts`` (raw outputs, not verdicts) for ``tests/testbed/test_demo.py``.
A fact that does not hold raises :class:`~testbed.demo_cluster.DemoError`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cni_plugin import constants as c
from testbed import demo_node as N
from testbed.bookinfo import manifests as M
from testbed.demo_cluster import (
    Cluster,
    DemoError,
    container_facts,
    is_ready,
    wait_for,
)
from testbed.node import Testbed

NS = M.NAMESPACE
STEPS = 9
ZTUNNEL_PORTS = {"tcp": [15001, 15006, 15008, 15053], "udp": [15053]}


def heading(n: int, title: str) -> None:
    print(f"\n== {n}/{STEPS}  {title}", flush=True)


def command(text: str) -> None:
    print(f"$ {text}", flush=True)


def show(text: str, limit: int = 30) -> None:
    lines = text.rstrip().splitlines()
    for line in lines[:limit]:
        print(f"    {line}")
    if len(lines) > limit:
        print(f"    ... ({len(lines) - limit} more lines)")
    sys.stdout.flush()


def note(text: str) -> None:
    print(f"  {text}", flush=True)


class Walkthrough:
    """The walkthrough on one node; ``facts[str(step)]`` collects each step's evidence."""

    def __init__(self, bed: Testbed, backend: str) -> None:
        self.bed = bed
        self.backend = backend
        self.facts: dict[str, Any] = {}
        self.cluster: Cluster | None = None
        self.ips: dict[str, str] = {}

    @property
    def k(self) -> Cluster:
        if self.cluster is None:
            raise DemoError("the node is not up")
        return self.cluster

    # --- helpers ----------------------------------------------------------------------------
    def kubectl(self, *args: str, stdin: str | None = None, echo: bool = True) -> str:
        if echo:
            command("kubectl " + " ".join(args))
        proc = self.bed.kubectl(*args, input=stdin, check=False)
        if proc.returncode != 0:
            raise DemoError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout

    def agent_table(self) -> str:
        command(f"istio-cni-agent pods -n {NS}")
        done = subprocess.run(
            [sys.executable, "-m", "node_agent.cli", "pods", "-n", NS, "--run-dir",
             str(self.k.run_dir)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        if done.returncode != 0:
            raise DemoError(f"istio-cni-agent pods failed: {done.stderr.strip()}")
        show(done.stdout)
        return done.stdout

    def wait_agent(self, what: str, ok: Callable[[dict[str, Any]], bool], names: list[str]) -> None:
        def probe() -> bool:
            self.k.assert_mesh_alive()
            pods = self.k.agent_pods(NS)
            return all(n in pods and ok(pods[n]) for n in names)

        wait_for(
            f"the agent shows {what} for {', '.join(names)}",
            float(os.environ.get("DEMO_ENROLL_TIMEOUT", "30")),
            probe,
            f"Look at {self.k.log_path('istio-cni-agent')}:\n{self.k.log_tail('istio-cni-agent')}",
        )

    def request(self, path: str = "/productpage", target: str = "productpage-v1") -> str:
        url = f"http://{self.ips[target]}:{M.PORT}{path}"
        command(f"kubectl exec -n {NS} {M.CLIENT} -- wget -qO- {url}")
        proc = self.bed.kubectl("exec", "-n", NS, M.CLIENT, "--", "wget", "-qO-", url, check=False)
        if proc.returncode != 0:
            raise DemoError(f"request to {url} failed: {proc.stderr.strip() or proc.stdout}")
        return proc.stdout

    def pod_pid(self, name: str) -> int:
        pod = self.k.pod(NS, name)
        if pod is None:
            raise DemoError(f"pod {NS}/{name} is gone")
        return N.pod_pid(self.bed.layout, pod["metadata"]["uid"])

    # --- 1 ------------------------------------------------------------------------------------
    def step1_node(self) -> None:
        heading(1, "A real node (API server, kubelet, containerd) with our CNI installed by our "
                   "installer, chained after bridge; the agent running; the ztunnel stand-in "
                   "connected")  # fmt: skip
        command(f"istio-cni-testbed up --mesh --backend {self.backend}")
        started = time.monotonic()
        info = self.bed.up(mesh=True, backend=self.backend)
        self.cluster = Cluster(self.bed, info)
        note(f"node {info['node']} Ready, Kubernetes {info.get('kubernetes_version')}, "
             f"mesh up in {time.monotonic() - started:.1f}s")  # fmt: skip
        chain: list[str] = []
        for f in sorted(self.bed.layout.cni_conf_dir.glob("*.conflist")):
            chain = [p.get("type", "?") for p in json.loads(f.read_text()).get("plugins", [])]
            if "istio-cni" in chain:
                note(f"CNI chain in {f}: {' -> '.join(chain)}")
                break
        if not chain or chain[-1] != "istio-cni" or chain[0] != "bridge":
            raise DemoError(f"the conflist does not chain istio-cni after bridge: {chain}")
        plugin = self.bed.layout.cni_bin_dir / "istio-cni"
        if not plugin.exists():
            raise DemoError(f"the installer did not put the plugin at {plugin}")
        note(f"plugin executable installed: {plugin} ({plugin.stat().st_size // 1024} KiB)")

        def connected() -> dict[str, Any] | None:
            st = self.k.agent_state()
            return st if st.get("ready") and st.get("ztunnel_connected") else None

        state = wait_for(
            "the agent ready with the ztunnel stand-in connected",
            30,
            connected,
            f"Look at {self.k.log_path('istio-cni-agent')} and "
            f"{self.k.log_path('ztunnel-standin')}:\n{self.k.log_tail('ztunnel-standin')}",
        )
        note(f"agent pid {state['pid']} ready, backend {state.get('backend')}; ztunnel stand-in "
             f"connected over {info['ztunnel_socket_in_node']}")  # fmt: skip
        self.facts["1"] = {
            "chain": chain,
            "plugin": str(plugin),
            "agent_pid": state["pid"],
            "agent_backend": state.get("backend"),
            "ztunnel_connected": state.get("ztunnel_connected"),
            "mesh_pids": info.get("mesh_pids", {}),
        }

    # --- 2 ------------------------------------------------------------------------------------
    def step2_bookinfo(self) -> None:
        heading(2, "bookinfo starts before its namespace joins the mesh: real pods, one "
                   "service account each, readiness probes")  # fmt: skip
        info = self.k.info
        image = info["images"]["busybox"]
        self.kubectl("create", "namespace", NS)
        waves = len(M.waves())
        command(f"kubectl apply -f -    # testbed/bookinfo: service accounts, the app scripts "
                f"(a ConfigMap), then the pods in {waves} waves, callees first")  # fmt: skip
        note("no kube-proxy or cluster DNS on the testbed: callers get their upstreams' pod IPs")
        # The service accounts exist once apply returns (their tokens are projected into pods
        # at start, nothing to wait for), so the pods that name them can follow at once.
        self.kubectl("apply", "-f", "-", stdin=json.dumps(M.as_list(M.objects())), echo=False)
        first = True
        for wave in M.waves():
            specs = [M.pod(w, image, M.upstream_env(w, self.ips)) for w in wave]
            if first:
                specs.append(M.client_pod(image))
                first = False
            self.kubectl("apply", "-f", "-", stdin=json.dumps(M.as_list(specs)), echo=False)
            names = [s["metadata"]["name"] for s in specs]
            self.ips.update(self._wait_ips(names))
        names = [w.name for w in M.BOOKINFO] + [M.CLIENT]
        self._wait_ready(names)
        table = self.kubectl("get", "pods", "-n", NS, "-o", "wide")
        show(table)
        body = self.request()
        show(body, 6)
        if "details:" not in body or '"reviews":' not in body or "unavailable" in body:
            raise DemoError(f"productpage did not get answers from details and reviews: {body}")
        pods = self.k.pods(NS)
        self.facts["2"] = {
            "pods": {
                n: {
                    "ip": p["status"].get("podIP"),
                    "service_account": p["spec"].get("serviceAccountName"),
                    "ready": is_ready(p),
                    "probe": p["spec"]["containers"][0].get("readinessProbe"),
                    "labels": p["metadata"].get("labels"),
                }
                for n, p in pods.items()
            },
            "response": body,
        }

    def _wait_ips(self, names: list[str]) -> dict[str, str]:
        def probe() -> dict[str, str] | None:
            pods = self.k.pods(NS)
            ips = {n: pods[n]["status"].get("podIP") for n in names if n in pods}
            return (
                {n: ip for n, ip in ips.items() if ip} if all(ips.get(n) for n in names) else None
            )

        return wait_for(f"pod IPs for {', '.join(names)}", 60, probe,
                        "Run `kubectl describe pods -n bookinfo` (KUBECONFIG from "
                        "`istio-cni-testbed status`) to see why.")  # fmt: skip

    def _wait_ready(self, names: list[str], timeout: float = 90) -> None:
        def probe() -> bool:
            pods = self.k.pods(NS)
            return all(n in pods and is_ready(pods[n]) for n in names)

        wait_for(f"pods Ready: {', '.join(names)}", timeout, probe,
                 f"See {self.bed.layout.logs_dir}/kubelet.log.")  # fmt: skip

    # --- 3 ------------------------------------------------------------------------------------
    def step3_table_tcp(self) -> None:
        heading(3, "The agent's workloads table: every bookinfo pod is plain TCP, not in the mesh")
        names = self.names()
        self.wait_agent("each pod, not enrolled", lambda p: p.get("state") != "enabled" and
                        bool(p.get("ips")), names)  # fmt: skip
        table = self.agent_table()
        expect_protocol(table, names, "TCP")
        self.facts["3"] = {"table": table}

    def names(self) -> list[str]:
        """The bookinfo pods that exist now (reviews-v4 once step 7 added it) and the client."""
        out = [w.name for w in M.BOOKINFO] + [M.CLIENT]
        return out + ([M.LATE.name] if M.LATE.name in self.ips else [])

    # --- 4 ------------------------------------------------------------------------------------
    def step4_label(self) -> None:
        heading(4, "One label puts the namespace in the mesh, as in Istio's walkthrough: "
                   "no pod restarts, every pod stays Ready")  # fmt: skip
        names = self.names()
        before = {n: container_facts(p) for n, p in self.k.pods(NS).items() if n in names}
        kubelet_log = self.bed.layout.logs_dir / "kubelet.log"
        log_offset = kubelet_log.stat().st_size if kubelet_log.exists() else 0
        sampler = ReadinessSampler(self.k, names)
        sampler.start()
        try:
            self.kubectl("label", "namespace", NS, f"{c.DATAPLANE_MODE_LABEL}=ambient")
            t0 = time.monotonic()
            self.wait_agent("HBONE (enrolled)", lambda p: p.get("state") == "enabled", names)
            took = time.monotonic() - t0
            time.sleep(3)  # three probe periods (failureThreshold 1) with the redirection on
        finally:
            samples, unready = sampler.stop()
        after = {n: container_facts(p) for n, p in self.k.pods(NS).items() if n in names}
        note(
            f"all {len(names)} pods enrolled {took:.1f}s after the label; per pod, before -> after:"
        )
        rows = [("POD", "RESTARTS", "CONTAINER STARTED", "READY SINCE")]
        for n in names:
            b, a = before[n], after[n]
            rows.append((n, f"{b['restarts']} -> {a['restarts']}",
                         f"{b['started_at']} -> {a['started_at']}",
                         "unchanged" if b["ready_since"] == a["ready_since"] else
                         f"{b['ready_since']} -> {a['ready_since']}"))  # fmt: skip
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        show("\n".join("  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)) for r in rows))
        note(f"readiness sampled {samples} times during enrollment: "
             + ("never unready" if not unready else f"UNREADY: {sorted(unready)}"))  # fmt: skip
        failed_probes = probe_failures(kubelet_log, log_offset)
        if failed_probes:
            # A probe landing between the pod's rules and the stand-in's listener is refused
            # (Istio's own order: rules, ztunnel, then the probe ipset); a single miss is
            # absorbed by failureThreshold, and Ready never changing is what counts.
            note(f"kubelet logged {len(failed_probes)} single failed probe(s) meanwhile "
                 f"(absorbed by failureThreshold 3): {failed_probes[0][:160]}")  # fmt: skip
        changed = [n for n in names if before[n] != after[n]]
        if changed or unready:
            raise DemoError(
                f"pods restarted or went unready when the namespace joined the mesh: "
                f"{sorted(set(changed) | unready)}; see {self.bed.layout.logs_dir}/kubelet.log"
            )
        self.facts["4"] = {
            "before": before,
            "after": after,
            "samples": samples,
            "unready": sorted(unready),
            "enrolled_after_s": round(took, 2),
            "failed_probes": failed_probes,
        }


def probe_failures(kubelet_log: Path, offset: int) -> list[str]:
    """kubelet's "Readiness probe ... failed" lines written after ``offset``."""
    try:
        with open(kubelet_log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return []
    return [ln for ln in text.splitlines() if "probe for" in ln and "failed" in ln]


def protocols(table: str) -> dict[str, str]:
    """POD NAME -> PROTOCOL from ``istio-cni-agent pods`` output."""
    lines = table.splitlines()
    if not lines or "POD NAME" not in lines[0] or "PROTOCOL" not in lines[0]:
        return {}
    # Columns are padded as kubectl pads them; -n leaves the NAMESPACE column out.
    name_at, proto_at = lines[0].index("POD NAME"), lines[0].index("PROTOCOL")
    out: dict[str, str] = {}
    for line in lines[1:]:
        name, proto = line[name_at:].split()[:1], line[proto_at:].split()[:1]
        if name and proto:
            out[name[0]] = proto[0]
    return out


def expect_protocol(table: str, names: list[str], want: str) -> None:
    got = protocols(table)
    wrong = {n: got.get(n) for n in names if got.get(n) != want}
    if wrong:
        raise DemoError(f"want PROTOCOL {want} for every pod, got {wrong}")


class ReadinessSampler:
    """Polls the pods' Ready condition on a thread: how many samples, who was ever unready."""

    def __init__(self, cluster: Cluster, names: list[str]) -> None:
        self.cluster = cluster
        self.names = names
        self.samples = 0
        self.unready: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="readiness", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.3):
            try:
                pods = self.cluster.pods(NS)
            except Exception:  # an API hiccup is not a readiness failure; sample again
                continue
            self.samples += 1
            self.unready |= {n for n in self.names if not (n in pods and is_ready(pods[n]))}

    def stop(self) -> tuple[int, set[str]]:
        self._stop.set()
        self._thread.join(10)
        return self.samples, self.unready
