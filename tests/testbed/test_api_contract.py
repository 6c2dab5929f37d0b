"""The agent's use of the Kubernetes API, checked against the testbed's real kube-apiserver
(the current release, not a fake): the ``spec.nodeName`` field-selector list+watch, the
``pods/status`` merge patch of the redirection annotation, the namespace watch, the 410
relist, and WatchList (``sendInitialEvents``): the server offers it, the kubernetes client
only uses it when asked, and the agent's informers, which never ask, work beside it.

Everything goes through :class:`node_agent.kube.KubeApi` (the agent's real client) and the
agent's :class:`Informer`; pods are bound to the node by ``spec.nodeName`` directly or to a
node that does not exist, so no kubelet work is needed except where said.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from cni_plugin import constants as c
from node_agent.adapters import NamespacesListWatch, PodsListWatch
from node_agent.informers import Informer, ResourceExpired
from node_agent.kube import KubeApi
from node_agent.resources import NamespaceInfo, PodInfo
from testbed.layout import Layout
from testbed.node import Testbed
from tests.testbed import pods as P
from tests.testbed.test_agent_light_pods import restart_apiserver

pytestmark = [pytest.mark.testbed, pytest.mark.timeout(300)]
GHOST_NODE = "icni-tb-no-such-node"


def _pod(name: str, node: str, image: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 0,
            "automountServiceAccountToken": False,
            "containers": [{"name": "app", "image": image}],
        },
    }


def _until(cond: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out ({timeout}s) waiting for {what}")


@pytest.fixture
def agent_kube(testbed_info: dict[str, Any]) -> Iterator[KubeApi]:
    api = KubeApi(testbed_info["kubeconfig"])
    yield api
    api.close()


class _Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def __call__(self, old: Any, new: Any) -> None:
        kind = "add" if old is None else "delete" if new is None else "update"
        with self.lock:
            self.events.append((kind, (new or old).name))

    def seen(self, kind: str, name: str) -> bool:
        with self.lock:
            return (kind, name) in self.events


def test_field_selector_watch_sees_only_this_nodes_pods(
    testbed_node: Testbed,
    testbed_info: dict[str, Any],
    kube_namespace: str,
    agent_kube: KubeApi,
) -> None:
    node = testbed_info["node"]
    rec = _Recorder()
    inf: Informer[PodInfo] = Informer(
        "pods",
        PodsListWatch(agent_kube, node),
        PodInfo.from_json,
        lambda p: p.uid,
        rec,
        retry_delay=0.1,
    )
    inf.start()
    try:
        assert inf.synced.wait(30)
        image = testbed_info["images"]["busybox"]
        items = [_pod("here", node, image), _pod("elsewhere", GHOST_NODE, image)]
        testbed_node.kubectl(
            "apply", "-n", kube_namespace, "-f", "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}),
        )  # fmt: skip
        _until(lambda: rec.seen("add", "here"), 30, "the watch to deliver this node's pod")
        # Both pods exist in the API; only ours may show (the other one is the next line's
        # proof that the selector was applied by the server, not by luck of timing).
        listed, _ = agent_kube.list_pods(GHOST_NODE)
        assert [p["metadata"]["name"] for p in listed] == ["elsewhere"]
        testbed_node.kubectl("delete", "pod", "here", "-n", kube_namespace, "--wait=false")
        testbed_node.kubectl(
            "delete", "pod", "here", "-n", kube_namespace, "--grace-period=0", "--force",
            check=False,
        )  # fmt: skip
        _until(lambda: rec.seen("delete", "here"), 60, "the watch to deliver the delete")
        assert not any(name == "elsewhere" for _, name in rec.events), rec.events
    finally:
        inf.stop()


def test_pods_status_merge_patch_sets_and_clears_the_annotation(
    testbed_node: Testbed,
    testbed_info: dict[str, Any],
    kube_namespace: str,
    agent_kube: KubeApi,
) -> None:
    image = testbed_info["images"]["busybox"]
    testbed_node.kubectl(
        "apply", "-n", kube_namespace, "-f", "-",
        input=json.dumps(_pod("patched", GHOST_NODE, image)),
    )  # fmt: skip
    assert agent_kube.patch_redirection(kube_namespace, "patched", "enabled")
    pod = agent_kube.get_pod(kube_namespace, "patched")
    assert pod is not None
    assert pod["metadata"]["annotations"][c.REDIRECTION_ANNOTATION] == ("enabled")
    assert agent_kube.patch_redirection(kube_namespace, "patched", None)
    pod = agent_kube.get_pod(kube_namespace, "patched")
    assert pod is not None
    assert c.REDIRECTION_ANNOTATION not in (pod["metadata"].get("annotations") or {})
    # A pod that is gone is "not there", not an error (the agent's delete path relies on it).
    assert agent_kube.patch_redirection(kube_namespace, "never-existed", "x") is False
    assert agent_kube.get_pod(kube_namespace, "never-existed") is None


def test_interrupt_ends_a_watch_blocked_in_its_read_at_once(testbed_info: dict[str, Any]) -> None:
    """The informers' stop does not wait out a watch: ``interrupt_watches`` shuts the socket
    of a watch that is waiting for events (none come for a node that does not exist, for up
    to the 240 s asked) and the watch ends with ApiUnavailable, promptly."""
    from node_agent.informers import ApiUnavailable

    api = KubeApi(testbed_info["kubeconfig"])
    ended: list[BaseException | None] = []

    def watch() -> None:
        _, rv = api.list_pods(GHOST_NODE)
        try:
            for _ in api.watch_pods(GHOST_NODE, rv, 240):
                pass
            ended.append(None)
        except BaseException as e:
            ended.append(e)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        _until(lambda: api._watches, 30, "the watch open")
        t0 = time.monotonic()
        api.interrupt_watches()
        t.join(timeout=10)
        assert not t.is_alive() and time.monotonic() - t0 < 5
        assert len(ended) == 1 and isinstance(ended[0], ApiUnavailable), ended
        assert "stopping" in str(ended[0])
    finally:
        api.close()


def test_namespace_watch_sees_label_changes(
    testbed_node: Testbed, kube_namespace: str, agent_kube: KubeApi
) -> None:
    labels: dict[str, dict[str, str]] = {}
    lock = threading.Lock()

    def handler(old: NamespaceInfo | None, new: NamespaceInfo | None) -> None:
        if new is not None:
            with lock:
                labels[new.name] = dict(new.labels)

    inf: Informer[NamespaceInfo] = Informer(
        "namespaces",
        NamespacesListWatch(agent_kube),
        NamespaceInfo.from_json,
        lambda n: n.name,
        handler,
        retry_delay=0.1,
    )
    inf.start()
    try:
        assert inf.synced.wait(30)
        assert kube_namespace in labels
        testbed_node.kubectl(
            "label", "namespace", kube_namespace, f"{c.DATAPLANE_MODE_LABEL}=ambient"
        )
        _until(
            lambda: labels.get(kube_namespace, {}).get(c.DATAPLANE_MODE_LABEL) == "ambient",
            30,
            "the namespace watch to deliver the label",
        )
    finally:
        inf.stop()


def test_a_too_old_resource_version_is_410_and_the_informer_relists(
    testbed_node: Testbed,
    testbed_info: dict[str, Any],
    kube_namespace: str,
    agent_kube: KubeApi,
) -> None:
    # What an agent away for long meets: etcd compacted past its resourceVersion and the API
    # server's watch cache started after it. Then resourceVersion 1 is 410 Gone.
    compact_etcd(testbed_node)
    restart_apiserver(testbed_node, testbed_info)
    with pytest.raises(ResourceExpired, match="too old resource version"):
        for _ in agent_kube.watch_namespaces("1", 5):
            pass
    image = testbed_info["images"]["busybox"]

    class AwayTooLong:
        """The agent's real pod source, except that its first watch resumes from a version
        long gone (as after a long partition), and a pod is created in between: only a
        relist can deliver it."""

        def __init__(self) -> None:
            self.inner = PodsListWatch(agent_kube, GHOST_NODE)
            self.watches = 0

        def list(self) -> tuple[list[dict[str, Any]], str]:
            return self.inner.list()

        def watch(self, resource_version: str, timeout_seconds: int) -> Any:
            self.watches += 1
            if self.watches == 1:
                testbed_node.kubectl(
                    "apply", "-n", kube_namespace, "-f", "-",
                    input=json.dumps(_pod("missed", GHOST_NODE, image)),
                )  # fmt: skip
                resource_version = "1"
            return self.inner.watch(resource_version, timeout_seconds)

    rec = _Recorder()
    inf: Informer[PodInfo] = Informer(
        "pods", AwayTooLong(), PodInfo.from_json, lambda p: p.uid, rec, retry_delay=0.1
    )
    inf.start()
    try:
        _until(lambda: rec.seen("add", "missed"), 60, "the missed pod, through a relist")
        assert inf.relists == 2 and inf.errors == 0, (inf.relists, inf.errors)
    finally:
        inf.stop()
    # The rest of the control plane relists too: a new namespace gets its default account
    # again (the controller-manager's watches met the same 410), so the node is left healthy.
    probe = f"{kube_namespace}-after"
    testbed_node.kubectl("create", "namespace", probe)
    try:
        P.wait_service_account(testbed_node, probe, timeout=120)
    finally:
        testbed_node.kubectl("delete", "namespace", probe, "--wait=false")


ETCD_COMPACT = """
import json, sys, urllib.request
def post(path, body):
    req = urllib.request.Request(sys.argv[1] + path, data=json.dumps(body).encode())
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.load(r)
rev = post("/v3/kv/range", {"key": "AA=="})["header"]["revision"]
post("/v3/kv/compaction", {"revision": rev, "physical": True})
print(rev)
"""


def compact_etcd(bed: Testbed) -> None:
    """Compact the node's etcd at its current revision (etcd's JSON gateway, from the node)."""
    url = f"http://127.0.0.1:{bed.layout.etcd_port}"
    out = bed.node_exec([sys.executable, "-c", ETCD_COMPACT, url])
    assert int(out.stdout.strip()) > 1


def test_server_offers_watchlist_and_the_agent_does_not_depend_on_it(
    testbed_node: Testbed,
    testbed_info: dict[str, Any],
    kube_namespace: str,
    agent_kube: KubeApi,
) -> None:
    """A WatchList request (``sendInitialEvents=true``) streams the current pods as ADDED
    and ends the initial set with a bookmark annotated ``k8s.io/initial-events-end``; the
    kubernetes client does this only when told (its Watch never adds the parameter), and
    the agent's list+watch sees the same pods either way."""
    from kubernetes import client, watch

    image = testbed_info["images"]["busybox"]
    testbed_node.kubectl(
        "apply", "-n", kube_namespace, "-f", "-",
        input=json.dumps(_pod("listed", GHOST_NODE, image)),
    )  # fmt: skip
    core = client.CoreV1Api(testbed_node.kube_client())
    initial: list[str] = []
    end_bookmark = False
    watch_mod: Any = watch  # untyped library
    w = watch_mod.Watch()
    for ev in w.stream(
        core.list_namespaced_pod,
        kube_namespace,
        send_initial_events=True,
        resource_version_match="NotOlderThan",
        allow_watch_bookmarks=True,
        timeout_seconds=20,
    ):
        if ev["type"] == "ADDED":
            initial.append(ev["object"].metadata.name)
        elif ev["type"] == "BOOKMARK":
            annotations = ev["raw_object"]["metadata"].get("annotations") or {}
            if annotations.get("k8s.io/initial-events-end") == "true":
                end_bookmark = True
                w.stop()
    assert initial == ["listed"] and end_bookmark, (initial, end_bookmark)
    # The agent's own path (plain list, then watch from its resourceVersion).
    listed, rv = agent_kube.list_pods(GHOST_NODE)
    assert "listed" in [p["metadata"]["name"] for p in listed] and rv


def test_agent_informers_work_on_a_server_without_watchlist(testbed_info: dict[str, Any]) -> None:
    """A second node whose kube-apiserver has WatchList switched off (as on a cluster that
    disabled the beta gate): a WatchList request is not honoured there (no initial-events
    bookmark), and the agent's informers list+watch exactly as on the default server."""
    from kubernetes import client, watch

    bed = Testbed(
        Layout.for_instance(f"nowl{os.getpid()}"),
        apiserver_flags=["--feature-gates=WatchList=false"],
    )
    try:
        info = bed.up()
        bed.kubectl("create", "namespace", "nowl")
        P.wait_service_account(bed, "nowl")
        image = info["images"]["busybox"]
        bed.kubectl(
            "apply", "-n", "nowl", "-f", "-", input=json.dumps(_pod("first", GHOST_NODE, image))
        )
        core = client.CoreV1Api(bed.kube_client())
        watch_mod: Any = watch  # untyped library
        w = watch_mod.Watch()
        end_bookmark = False
        with contextlib.suppress(client.ApiException):  # refused outright is "not offered" too
            for ev in w.stream(
                core.list_namespaced_pod,
                "nowl",
                send_initial_events=True,
                resource_version_match="NotOlderThan",
                allow_watch_bookmarks=True,
                timeout_seconds=5,
            ):
                annotations = ev["raw_object"].get("metadata", {}).get("annotations") or {}
                if ev["type"] == "BOOKMARK" and annotations.get("k8s.io/initial-events-end"):
                    end_bookmark = True
        assert not end_bookmark, "WatchList still offered with the gate off"

        api = KubeApi(info["kubeconfig"])
        rec = _Recorder()
        inf: Informer[PodInfo] = Informer(
            "pods", PodsListWatch(api, GHOST_NODE), PodInfo.from_json, lambda p: p.uid, rec
        )
        inf.start()
        try:
            _until(lambda: rec.seen("add", "first"), 30, "the listed pod")
            bed.kubectl(
                "apply", "-n", "nowl", "-f", "-",
                input=json.dumps(_pod("second", GHOST_NODE, image)),
            )  # fmt: skip
            _until(lambda: rec.seen("add", "second"), 30, "the watched pod")
        finally:
            inf.stop()
            api.close()
    finally:
        assert bed.down() == []
