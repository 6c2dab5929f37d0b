"""The deployment on the real single-node Kubernetes, as users install it: our chart through
Helm's engine with the seed's IstioCNI values, and the ``istio-cni-node`` DaemonSet's pod
running our image (built here, imported into containerd). The pod's agent uses its own
ServiceAccount token (a missing or excessive permission shows), its in-process installer
chains the image's plugin into containerd's conflist, pods created through the API
(kubelet -> containerd CRI -> bridge + host-local -> istio-cni) come up enrolled, and
``helm uninstall`` leaves the node as it was before ``helm install``.

Bad input: a chart value of the wrong type, a missing image, a node without a cgroup v2
hierarchy for the ebpf backend each end in one line (``helm install`` or the pod's status).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed import agent_image
from testbed import daemonset as D
from testbed.mesh import mesh_env
from testbed.node import Testbed, TestbedError
from testbed.node_state import NodeState, differences
from tests.testbed import pods as P

pytestmark = [pytest.mark.testbed, pytest.mark.timeout(1800)]
SA = "system:serviceaccount:istio-cni:istio-cni"
NEEDS_AGENT_IMAGE = True  # built before the first test (testbed.pytest_plugin.prebuild)
ROOT = str(agent_image.ROOT)


def wait(cond: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out ({timeout}s) waiting for {what}")


class NodeProcess:
    def __init__(self, bed: Testbed, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with open(log, "ab") as out:
            self.proc = bed.node_popen(argv, env={**os.environ, **env}, cwd=ROOT, stdout=out,
                                       stderr=subprocess.STDOUT)  # fmt: skip

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()

    def text(self) -> str:
        return self.log.read_text(errors="replace")


def conflist_has_istio(info: dict[str, Any]) -> bool:
    for f in Path(info["cni_conf_dir"]).glob("*.conflist"):
        try:
            if any(p.get("type") == "istio-cni" for p in json.loads(f.read_text())["plugins"]):
                return True
        except (OSError, ValueError, KeyError):
            continue
    return False


@pytest.fixture(scope="module")
def built_image(testbed_node: Testbed) -> agent_image.AgentImage:
    """Our image, built (cached) and imported into the node's containerd."""
    image = agent_image.build()
    D.import_image(testbed_node, image)
    return image


@pytest.fixture(scope="module")
def agent_image_ref(built_image: agent_image.AgentImage) -> str:
    return built_image.ref


def ensure_namespace(bed: Testbed) -> None:
    ns = D.helm_namespace()
    if bed.kubectl("get", "namespace", ns, check=False).returncode != 0:
        bed.kubectl("create", "namespace", ns)


def fresh_host_probe_state(info: dict[str, Any]) -> None:
    """Start from a node without the host probe rule and sets, as a new node is: a host-
    process agent of an earlier test on this shared node that stopped with pods still
    enrolled keeps them (by design, for those pods' kubelet probes), and the DaemonSet's
    uninstall, rightly, takes them away, which a snapshot taken with them would call a
    change."""
    from node_agent.host_probe import HostProbe

    HostProbe(node_netns=info["node_netns"]).teardown()


def uninstall_quietly(bed: Testbed) -> None:
    with contextlib.suppress(D.DaemonSetError):
        D.uninstall(bed)
    D.wait_gone(bed)


def test_a_value_of_the_wrong_type_fails_helm_install_in_one_line(
    testbed_node: Testbed, testbed_info: dict[str, Any], agent_image_ref: str
) -> None:
    bed = testbed_node
    ensure_namespace(bed)
    vals = D.values(testbed_info, "iptables", agent_image_ref)
    vals["ambient"] = {**vals["ambient"], "enabled": "yes"}
    with pytest.raises(D.DaemonSetError) as e:
        D.install(bed, vals)
    msg = str(e.value)
    assert "\n" not in msg and "/ambient/enabled" in msg and "want boolean" in msg, msg
    assert D.agent_pods(bed) == []
    assert bed.kubectl("get", "ds", "istio-cni-node", "-n", "istio-cni",
                       check=False).returncode != 0  # fmt: skip


def test_a_missing_image_is_one_line_in_the_pod_status(
    testbed_node: Testbed, testbed_info: dict[str, Any], agent_image_ref: str
) -> None:
    bed = testbed_node
    ensure_namespace(bed)
    missing = agent_image_ref.rsplit(":", 1)[0] + ":not-imported"
    D.install(bed, D.values(testbed_info, "iptables", missing))
    try:
        with pytest.raises(D.DaemonSetError) as e:
            D.wait_ready(bed, timeout=120)
        msg = str(e.value)
        assert "\n" not in msg and "ErrImageNeverPull" in msg and "not-imported" in msg, msg
    finally:
        uninstall_quietly(bed)


def test_ebpf_without_a_cgroup2_hierarchy_is_one_line_not_a_silent_crash_loop(
    testbed_node: Testbed, testbed_info: dict[str, Any], agent_image_ref: str
) -> None:
    bed = testbed_node
    ensure_namespace(bed)
    vals = D.values(testbed_info, "ebpf", agent_image_ref)
    # a cgroup v1 hierarchy where the host's cgroup v2 root is expected
    v1 = next(str(d.parent) for d in map(Path, testbed_info["cgroup_dirs"])
              if "unified" not in str(d))  # fmt: skip
    vals["ambient"] = {**vals["ambient"], "hostCgroup2Root": v1}
    D.install(bed, vals)
    try:
        with pytest.raises(D.DaemonSetError) as e:
            D.wait_ready(bed, timeout=180)
        msg = str(e.value)
        assert "\n" not in msg and "CrashLoopBackOff" in msg, msg
        assert "no cgroup v2 hierarchy" in msg and "mount cgroup2" in msg, msg
        # the reason is in the pod's own status, not only its log ...
        (pod,) = D.agent_pods(bed)
        (st,) = pod["status"]["containerStatuses"]
        assert st["lastState"]["terminated"]["exitCode"] == 1, st
        assert "no cgroup v2 hierarchy" in D.last_words(st), st["lastState"]
        # ... and the log is that one refusal, never a traceback
        previous = pod_log(bed, pod, previous=True)
        assert "Traceback" not in previous and "no cgroup v2 hierarchy" in previous, previous
    finally:
        uninstall_quietly(bed)


@pytest.fixture(scope="module")
def release(
    testbed_node: Testbed, testbed_info: dict[str, Any], agent_image_ref: str
) -> Iterator[dict[str, Any]]:
    """The chart installed with Helm (iptables backend); its pod Ready. Yields the node's
    state before the install and the pod. The last test uninstalls."""
    bed = testbed_node
    ensure_namespace(bed)
    fresh_host_probe_state(testbed_info)
    before = NodeState.take(bed, testbed_info)
    D.install(bed, D.values(testbed_info, "iptables", agent_image_ref))
    try:
        pod = D.wait_ready(bed, timeout=180)
        yield {"before": before, "pod": pod}
    finally:
        uninstall_quietly(bed)


def can(bed: Testbed, verb: str, resource: str, *extra: str) -> bool:
    out = bed.kubectl("auth", "can-i", verb, resource, f"--as={SA}", *extra, check=False)
    return out.stdout.strip() == "yes"


def test_rbac_grants_exactly_what_the_agent_uses(
    testbed_node: Testbed, release: dict[str, Any]
) -> None:
    bed = testbed_node
    for verb in ("get", "list", "watch"):
        for res in ("pods", "nodes", "namespaces"):
            assert can(bed, verb, res, "--all-namespaces"), (verb, res)
    assert can(bed, "patch", "pods", "--subresource=status", "-n", "demo")
    assert not can(bed, "update", "pods", "--subresource=status", "-n", "demo")
    assert can(bed, "get", "daemonsets/istio-cni-node", "-n", "istio-cni")
    for verb, res in (("patch", "pods"), ("delete", "pods"),
                      ("create", "pods"), ("get", "secrets"), ("list", "daemonsets"),
                      ("get", "daemonsets/other"), ("update", "namespaces"),
                      ("patch", "nodes")):  # fmt: skip
        assert not can(bed, verb, res, "-n", "istio-cni"), f"{SA} may {verb} {res}"


def pod_log(bed: Testbed, pod: dict[str, Any], previous: bool = False) -> str:
    return bed.kubectl("logs", "-n", "istio-cni", pod["metadata"]["name"], "-c", D.CONTAINER,
                       *(["--previous"] if previous else []), check=False).stdout  # fmt: skip


def test_the_pod_installs_the_plugin_and_enrolls_pods_created_through_the_api(
    testbed_node: Testbed, testbed_info: dict[str, Any], release: dict[str, Any],
    tmp_path: Path,
) -> None:  # fmt: skip
    bed, info, pod = testbed_node, testbed_info, release["pod"]
    spec = pod["spec"]
    assert spec["hostNetwork"] is True and spec["serviceAccountName"] == "istio-cni"
    assert spec["containers"][0]["image"].startswith(agent_image.REPO + ":")
    assert conflist_has_istio(info)
    # the plugin is the image's copy of `make plugin`'s build, byte for byte
    shipped = Path(agent_image.PLUGIN_DIR) / "istio-cni"
    assert (Path(info["cni_bin_dir"]) / "istio-cni").read_bytes() == shipped.read_bytes()
    # its kubeconfig: the in-cluster address (the kubernetes Service) and the pod's token
    kubeconfig = (Path(info["istio_cni_run_dir"]) / "istio-cni-kubeconfig").read_text()
    assert "server: https://10.96.0.1:443" in kubeconfig, kubeconfig
    token = bed.kubectl("exec", "-n", "istio-cni", pod["metadata"]["name"], "--", "cat",
                        "/var/run/secrets/kubernetes.io/serviceaccount/token").stdout  # fmt: skip
    assert token.strip() and token.strip() in kubeconfig

    standin = NodeProcess(bed, [sys.executable, "-m", "testbed.ztunnel_standin", "--socket",
                                info["ztunnel_socket_in_node"], "--access-log",
                                str(tmp_path / "access.log"), "--ca-dir", str(tmp_path / "ca")],
                          mesh_env(info, "iptables"), tmp_path / "standin.log")  # fmt: skip
    try:
        bed.kubectl("create", "namespace", "mesh")
        bed.kubectl("label", "namespace", "mesh", "istio.io/dataplane-mode=ambient")
        bed.kubectl("create", "namespace", "plain")
        for ns in ("mesh", "plain"):
            P.wait_service_account(bed, ns)
        images = info["images"]
        for ns in ("mesh", "plain"):
            bed.kubectl("apply", "-f", "-", input=P.manifest(ns, [
                P.httpd_pod("web", images["httpd"], 8080)]))  # fmt: skip
        P.wait_ready(bed, "mesh", ["web"], timeout=180)
        P.wait_ready(bed, "plain", ["web"], timeout=180)

        def annotation(ns: str) -> str | None:
            got = json.loads(bed.kubectl("get", "pod", "web", "-n", ns, "-o", "json").stdout)
            value = got["metadata"].get("annotations", {}).get("ambient.istio.io/redirection")
            return str(value) if value is not None else None

        assert annotation("mesh") == "enabled"  # the plugin returned only after enrolment
        assert annotation("plain") is None
        log = pod_log(bed, pod)
        assert "answered 403" not in log and "forbidden" not in log.lower(), log[-3000:]
        # out of the mesh again before the uninstall (as Istio documents)
        bed.kubectl("label", "namespace", "mesh", "istio.io/dataplane-mode-")
        wait(lambda: annotation("mesh") is None, 60, "the unlabelled pod to leave the mesh")
    finally:
        leave_mesh_and_delete(bed, "mesh")
        leave_mesh_and_delete(bed, "plain")
        standin.stop()


def traffic_client(name: str, image: str, url: str) -> dict[str, Any]:
    """A busybox pod requesting ``url`` every 0.2 s, one line per request: ``OK`` or
    ``FAIL@<epoch s>:<wget's exit code>`` (to place a failure in the rollout)."""
    loop = (f"while :; do timeout 5 wget -qO- {url} >/dev/null 2>&1; rc=$?; "
            f"if [ $rc = 0 ]; then echo OK; else echo FAIL@$(date +%s):$rc; fi; "
            f"sleep 0.2; done")  # fmt: skip
    pod = P.client_pod(name, image)
    pod["spec"]["containers"][0]["command"] = ["sh", "-c", loop]
    return pod


class LogFollow:
    """``kubectl logs -f`` of one pod into a file: an agent pod's log outlives its deletion
    (kubelet removes the pod's own log files with it)."""

    def __init__(self, bed: Testbed, pod: dict[str, Any], path: Path) -> None:
        self.path = path
        argv = [bed._kubectl_path(), f"--kubeconfig={bed.layout.kubeconfig}", "logs", "-f",
                "-n", "istio-cni", pod["metadata"]["name"], "-c", D.CONTAINER]  # fmt: skip
        with open(path, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(10)


def log_events(path: Path, source: str, keep: tuple[str, ...]) -> list[tuple[float, str]]:
    """(epoch, "source: msg fields") for the JSON log lines of ``path`` whose message has
    one of ``keep`` (every line when ``keep`` is empty)."""
    out: list[tuple[float, str]] = []
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
                t = time.mktime(time.strptime(rec["time"][:19], "%Y-%m-%dT%H:%M:%S"))
                t += float("0" + rec["time"][19:].rstrip("Z")) - time.timezone
            except (ValueError, KeyError, TypeError):
                continue
            text = str(rec.get("msg") or rec.get("message") or "")
            if keep and not any(k in text for k in keep):
                continue
            skip = ("time", "level", "logger", "msg", "message", "scope")
            extra = {k: v for k, v in rec.items() if k not in skip}
            out.append((t, f"{source}: {text} {json.dumps(extra)[:300]}"))
    return out


def rollout_timeline(
    failed: list[str],
    files: list[tuple[Path, str, tuple[str, ...]]],
    pods: dict[str, dict[str, Any]],
    marks: list[tuple[float, str]],
) -> str:
    """Each failed request placed among the test's marks and the agents' and the stand-in's
    events (for a run that lost one: where it went)."""
    events = [(float(f.split("@")[1].split(":")[0]), f"client: {f}") for f in failed]
    events += [(t, f"test: {what}") for t, what in marks]
    for path, source, keep in files:
        events += log_events(path, source, keep)
    for name, pod in pods.items():
        for st in (pod.get("status") or {}).get("containerStatuses") or []:
            for key, state in (st.get("state") or {}).items():
                for field in ("startedAt", "finishedAt"):
                    if field in state:
                        t = time.mktime(time.strptime(state[field], "%Y-%m-%dT%H:%M:%SZ"))
                        events.append((t - time.timezone, f"{name}: {key} {field}"))
    return "\n".join(f"{t:.3f} {what}" for t, what in sorted(events))


def slowest_request_ms(access_log: Path, client: str, since: float) -> tuple[int, int]:
    """(connections, the longest one's ms) of ``client``'s outbound connections the
    stand-in finished since ``since`` (epoch): how close the rollout came to the client's
    timeout."""
    durations = []
    with contextlib.suppress(OSError):
        for line in access_log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError, KeyError):
                rec = json.loads(line)
                t = time.mktime(time.strptime(rec["time"], "%Y-%m-%dT%H:%M:%SZ"))
                if (rec["direction"] == "outbound" and rec["src.workload"] == client
                        and t - time.timezone >= since - 1):  # fmt: skip
                    durations.append(int(str(rec["duration"]).removesuffix("ms")))
    return len(durations), max(durations, default=0)


class NodeFilesWatch:
    """Polls the plugin binary and the conflist entry every 20 ms on a thread; counts
    samples and the ones where either was missing."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.info = info
        self.samples = 0
        self.missing: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        plugin = Path(self.info["cni_bin_dir"]) / "istio-cni"
        while not self._stop.wait(0.02):
            self.samples += 1
            if not os.access(plugin, os.X_OK):
                self.missing.append(f"{time.time():.2f} plugin")
            if not conflist_has_istio(self.info):
                self.missing.append(f"{time.time():.2f} conflist entry")

    def __enter__(self) -> NodeFilesWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)


# Consecutive rollouts of one release (ICNI_UPGRADE_RUNS=5 for the figures in
# docs/operations.md; one in `make test`).
UPGRADE_RUNS = range(1, int(os.environ.get("ICNI_UPGRADE_RUNS", "1")) + 1)


@pytest.mark.parametrize("run", UPGRADE_RUNS)
def test_upgrade_under_traffic_loses_no_request(
    testbed_node: Testbed, testbed_info: dict[str, Any], release: dict[str, Any],
    built_image: agent_image.AgentImage, tmp_path: Path, run: int,
) -> None:  # fmt: skip
    """Roll the DaemonSet to another tag of the same build while a client in the mesh keeps
    requesting a server in the mesh, and a pod is created while no agent is ready."""
    bed, info = testbed_node, testbed_info
    old = D.wait_ready(bed, timeout=60)
    standin = NodeProcess(bed, [sys.executable, "-m", "testbed.ztunnel_standin", "--socket",
                                info["ztunnel_socket_in_node"], "--access-log",
                                str(tmp_path / "access.log"), "--ca-dir", str(tmp_path / "ca")],
                          mesh_env(info, "iptables"), tmp_path / "standin.log")  # fmt: skip
    ns, images = f"upgrade-{run}", info["images"]
    follow_old: LogFollow | None = None
    try:
        bed.kubectl("create", "namespace", ns)
        bed.kubectl("label", "namespace", ns, "istio.io/dataplane-mode=ambient")
        bed.kubectl("apply", "-f", "-", input=P.manifest(ns, [
            P.httpd_pod("web", images["httpd"], 8080)]))  # fmt: skip
        P.wait_ready(bed, ns, ["web"], timeout=180)
        ip = json.loads(bed.kubectl("get", "pod", "web", "-n", ns, "-o", "json").stdout)[
            "status"]["podIP"]  # fmt: skip
        bed.kubectl("apply", "-f", "-", input=P.manifest(ns, [
            traffic_client("client", images["busybox"], f"http://{ip}:8080/")]))  # fmt: skip
        P.wait_ready(bed, ns, ["client"], timeout=180)

        def requests() -> list[str]:
            out = bed.kubectl("logs", "-n", ns, "client", check=False).stdout
            return [ln for ln in out.split() if ln == "OK" or ln.startswith("FAIL@")]

        wait(lambda: len(requests()) >= 10, 60, "the client's first requests")
        new_tag = f"upgrade-{run}-{built_image.tag}"  # the same build under another tag
        D.import_image(bed, built_image, tags=(new_tag,))
        vals = D.values(info, "iptables", f"{agent_image.REPO}:{new_tag}")
        before = len(requests())
        started, started_at = time.monotonic(), time.time()
        follow_old = LogFollow(bed, old, tmp_path / "old-agent.log")
        with NodeFilesWatch(info) as files:
            D.upgrade(bed, vals)

            # the old pod goes first (maxUnavailable 1): a pod created once the old agent
            # stopped answering /readyz (it stops taking the plugin's requests right after)
            # meets no agent
            def old_stopping() -> bool:
                uid = old["metadata"]["uid"]
                return all(p["metadata"]["uid"] != uid or p["metadata"].get("deletionTimestamp")
                           for p in D.agent_pods(bed))  # fmt: skip

            def no_agent_ready() -> bool:
                try:
                    bed.node_http_get(info["node_ip"], 8000, "/readyz", timeout=2)
                except (TestbedError, OSError):
                    return True
                return False

            wait(lambda: old_stopping() and no_agent_ready(), 60, "the old agent to stop")
            gap_at = time.time()
            bed.kubectl("apply", "-f", "-", input=P.manifest(ns, [
                P.httpd_pod("late", images["httpd"], 8080)]))  # fmt: skip
            new = D.wait_ready(bed, timeout=180, not_uid=old["metadata"]["uid"])
            rolled, ready_at = time.monotonic() - started, time.time()
            P.wait_ready(bed, ns, ["late"], timeout=180)
            n = len(requests())
            wait(lambda: len(requests()) >= n + 10, 60, "requests with the new agent in charge")
        follow_old.stop()
        after = requests()
        (tmp_path / "new-agent.log").write_text(pod_log(bed, new))
        assert new["spec"]["containers"][0]["image"].endswith(":" + new_tag)
        assert files.samples > 100 and files.missing == [], files.missing[:5]
        during = after[before:]
        failed = [r for r in during if r != "OK"]
        conns, slowest = slowest_request_ms(tmp_path / "access.log", "client", started_at)
        print(f"upgrade: rolled in {rolled:.1f}s (from {started_at:.0f}); {len(during)} "
              f"requests meanwhile, failed: {failed}; files sampled {files.samples}x; "
              f"load {os.getloadavg()[0]:.1f}; slowest of {conns} proxied: "
              f"{slowest} ms")  # fmt: skip
        agent_events = ("agent", "ztunnel", "snapshot", "stop", "uninstall", "upgrade", "adopt",
                        "reconcile pass", "repair", "enrolling again")  # fmt: skip
        timeline = rollout_timeline(failed, [
            (tmp_path / "old-agent.log", "old agent", agent_events),
            (tmp_path / "new-agent.log", "new agent", agent_events),
            (tmp_path / "standin.log", "stand-in", ()),
        ], {"old agent": old, "new agent": new}, [
            (started_at, "helm upgrade"), (gap_at, "no agent ready; pod 'late' created"),
            (ready_at, "new agent Ready")])  # fmt: skip
        (tmp_path / "timeline.txt").write_text(timeline)
        if failed:
            print(timeline)
        assert len(during) >= 10 and failed == [], (started_at, failed, str(tmp_path))
        late = json.loads(bed.kubectl("get", "pod", "late", "-n", ns, "-o", "json").stdout)
        assert late["metadata"].get("annotations", {}).get(
            "ambient.istio.io/redirection") == "enabled"  # fmt: skip
        events = bed.kubectl("get", "events", "-n", ns, "--field-selector",
                             "involvedObject.name=late", "-o", "json").stdout  # fmt: skip
        reasons = [e["reason"] for e in json.loads(events)["items"]]
        print(f"upgrade: the pod created meanwhile: {reasons}")
        # it met no ready agent: the plugin failed its sandbox closed until the new one was
        assert "FailedCreatePodSandBox" in reasons and "Started" in reasons, reasons
    finally:
        if follow_old is not None:
            follow_old.stop()
        leave_mesh_and_delete(bed, ns)
        standin.stop()


def leave_mesh_and_delete(bed: Testbed, ns: str) -> None:
    """Unlabel, then delete the namespace and wait for its pods to go: a failed test must
    not leave enrolled pods for the next one's uninstall."""
    bed.kubectl("label", "namespace", ns, "istio.io/dataplane-mode-", check=False)
    bed.kubectl("delete", "pods", "--all", "-n", ns, "--wait=true", "--timeout=120s",
                check=False)  # fmt: skip
    bed.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_helm_uninstall_leaves_the_node_as_before_the_install(
    testbed_node: Testbed, testbed_info: dict[str, Any], release: dict[str, Any]
) -> None:
    bed = testbed_node
    D.uninstall(bed)
    D.wait_gone(bed)
    diff = differences(release["before"], NodeState.take(bed, testbed_info))
    assert diff == {}, diff
    assert not conflist_has_istio(testbed_info)


def test_pods_still_labelled_at_uninstall_keep_their_redirection_and_probes(
    testbed_node: Testbed, testbed_info: dict[str, Any], agent_image_ref: str, tmp_path: Path
) -> None:
    """Uninstall without unlabelling first (docs/operations.md, section 7): the plugin and
    its conflist entry go, but the enrolled pod keeps its in-pod rules and annotation, and
    the host probe rule and sets stay so kubelet's probes keep passing. Reinstalling,
    unlabelling and uninstalling again cleans the node."""
    bed, info = testbed_node, testbed_info
    ensure_namespace(bed)
    fresh_host_probe_state(info)
    before = NodeState.take(bed, info)
    vals = D.values(info, "iptables", agent_image_ref)
    D.install(bed, vals)
    standin = NodeProcess(bed, [sys.executable, "-m", "testbed.ztunnel_standin", "--socket",
                                info["ztunnel_socket_in_node"], "--access-log",
                                str(tmp_path / "access.log"), "--ca-dir", str(tmp_path / "ca")],
                          mesh_env(info, "iptables"), tmp_path / "standin.log")  # fmt: skip
    ns = "labelled"
    try:
        D.wait_ready(bed, timeout=180)
        bed.kubectl("create", "namespace", ns)
        bed.kubectl("label", "namespace", ns, "istio.io/dataplane-mode=ambient")
        bed.kubectl("apply", "-f", "-", input=P.manifest(ns, [
            P.httpd_pod("web", info["images"]["httpd"], 8080)]))  # fmt: skip
        P.wait_ready(bed, ns, ["web"], timeout=180)
        D.uninstall(bed)
        D.wait_gone(bed)
        left = differences(before, NodeState.take(bed, info))
        assert not conflist_has_istio(info) and "cni_bin_dir" not in left, left
        assert any("ISTIO_POSTRT" in ln for ln in left.get("iptables-save", [])), left
        assert left.get("ipset") == ["+ istio-inpod-probes-v4", "+ istio-inpod-probes-v6"], left
        web = json.loads(bed.kubectl("get", "pod", "web", "-n", ns, "-o", "json").stdout)
        assert web["metadata"]["annotations"]["ambient.istio.io/redirection"] == "enabled"
        P.wait_ready(bed, ns, ["web"], timeout=30)  # its probes still pass (SNAT rule kept)
        # the way out: reinstall, unlabel, uninstall
        D.install(bed, vals)
        D.wait_ready(bed, timeout=180)
        bed.kubectl("label", "namespace", ns, "istio.io/dataplane-mode-")
        wait(lambda: "redirection" not in json.dumps(json.loads(bed.kubectl(
            "get", "pod", "web", "-n", ns, "-o", "json").stdout)["metadata"].get(
            "annotations", {})), 60, "the pod to leave the mesh")  # fmt: skip
        D.uninstall(bed)
        D.wait_gone(bed)
        assert differences(before, NodeState.take(bed, info)) == {}
    finally:
        leave_mesh_and_delete(bed, ns)
        uninstall_quietly(bed)
        standin.stop()
