"""Uninstall or upgrade, fail closed (issue 14.2, 17.8): only a positive answer from the API
server (DaemonSet gone, being deleted, no longer targeting this node, credentials revoked)
uninstalls; an unreachable API server keeps everything."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pytest

from install.node_selection import selects_node
from install.teardown import StopQuestion, StopVerdict, decide, is_upgrade
from tests.time_scale import scaled

NODE = {"metadata": {"name": "node-1", "labels": {"pool": "blue", "cores": "8"}}}


class HttpError(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"({status})")
        self.status = status


def ds(pod_spec: dict[str, Any] | None = None, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "istio-cni-node"}
    if deleting:
        meta["deletionTimestamp"] = "2026-12-04T20:00:00Z"
    return {"metadata": meta, "spec": {"template": {"spec": pod_spec or {}}}}


def affinity(*terms: dict[str, Any]) -> dict[str, Any]:
    required = {"nodeSelectorTerms": list(terms)}
    return {
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": required}}
    }


def expr(key: str, op: str, *values: str) -> dict[str, Any]:
    return {"key": key, "operator": op, "values": list(values)}


@pytest.mark.parametrize(
    ("spec", "selected"),
    [
        ({}, True),
        ({"nodeSelector": {"pool": "blue"}}, True),
        ({"nodeSelector": {"pool": "green"}}, False),
        ({"nodeSelector": {"absent": "x"}}, False),
        (affinity({"matchExpressions": [expr("pool", "In", "blue", "red")]}), True),
        (affinity({"matchExpressions": [expr("pool", "NotIn", "blue")]}), False),
        (affinity({"matchExpressions": [expr("gpu", "DoesNotExist")]}), True),
        (affinity({"matchExpressions": [expr("gpu", "Exists")]}), False),
        (affinity({"matchExpressions": [expr("cores", "Gt", "4")]}), True),
        (affinity({"matchExpressions": [expr("cores", "Lt", "4")]}), False),
        (affinity({"matchFields": [expr("metadata.name", "NotIn", "node-1")]}), False),
        (affinity({"matchFields": [expr("metadata.name", "In", "node-1")]}), True),
        # terms are ORed, requirements within a term ANDed; an empty term matches nothing
        (affinity({"matchExpressions": [expr("gpu", "Exists")]}, {"matchExpressions": []}), False),
        (
            affinity(
                {"matchExpressions": [expr("gpu", "Exists")]},
                {"matchExpressions": [expr("pool", "In", "blue")]},
            ),
            True,
        ),
        (
            affinity({"matchExpressions": [expr("pool", "In", "blue"), expr("gpu", "Exists")]}),
            False,
        ),
    ],
)
def test_node_selection_follows_the_scheduler(spec: dict[str, Any], selected: bool) -> None:
    assert selects_node(spec, NODE) is selected


def reader(*answers: Any) -> Any:
    seq = list(answers)

    def read() -> Any:
        a = seq.pop(0) if len(seq) > 1 else seq[0]
        if isinstance(a, BaseException):
            raise a
        return a

    return read


def verdict(read_ds: Any, read_node: Any = None) -> StopVerdict:
    return decide(read_ds, read_node, pause_s=0.0)[0]


def test_only_positive_answers_uninstall() -> None:
    node = reader(NODE)
    assert verdict(reader(ds()), node) is StopVerdict.UPGRADE
    assert verdict(reader(HttpError(404)), node) is StopVerdict.UNINSTALL
    assert verdict(reader(ds(deleting=True)), node) is StopVerdict.UNINSTALL
    assert verdict(reader(HttpError(401)), node) is StopVerdict.UNINSTALL
    assert verdict(reader(HttpError(403)), node) is StopVerdict.UNINSTALL  # RBAC removed
    moved = ds({"nodeSelector": {"pool": "green"}})
    assert verdict(reader(moved), node) is StopVerdict.UNINSTALL  # no longer targets us
    # Anything that is not an answer keeps the plugin (fail closed).
    assert verdict(reader(ConnectionRefusedError("refused")), node) is StopVerdict.UNKNOWN
    assert verdict(reader(HttpError(500)), node) is StopVerdict.UNKNOWN
    assert verdict(reader(ds()), reader(TimeoutError("node"))) is StopVerdict.UNKNOWN
    # A blip is retried: the second answer counts.
    assert verdict(reader(TimeoutError("blip"), HttpError(404)), node) is StopVerdict.UNINSTALL


def test_retries_stay_inside_the_budget() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    v, reason = decide(
        reader(TimeoutError("down")), attempts=10, pause_s=0.5, budget_s=1.2,
        clock=lambda: now[0], sleep=sleep,
    )  # fmt: skip
    assert v is StopVerdict.UNKNOWN and "down" in reason
    assert sum(slept) <= 1.2 and len(slept) == 2


def unreachable_kubeconfig(tmp: Path) -> Path:
    """A kubeconfig whose server is a loopback port nobody listens on (refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp / "kubeconfig"
    path.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        f"clusters: [{{name: k, cluster: {{server: 'https://127.0.0.1:{port}', "
        "insecure-skip-tls-verify: true}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: c, context: {cluster: k, user: u}}]\n"
    )
    return path


def test_unreachable_api_server_is_not_an_uninstall(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The real client against a real unreachable address: before the fix this answered
    # "uninstall", and an API outage during a rollout removed the plugin from the node.
    import kubernetes.client  # noqa: F401  (the running agent has it loaded already)

    monkeypatch.setenv("KUBECONFIG", str(unreachable_kubeconfig(tmp_path)))
    question = StopQuestion("istio-system", "node-1")
    question.prepare()  # at agent start
    t0 = time.monotonic()
    assert question() is True
    assert time.monotonic() - t0 < scaled(3.0)  # inside the pod's 5 s grace period
    # Istio's AMBIENT_DISABLE_SAFE_UPGRADE: every stop uninstalls, nothing asked.
    assert is_upgrade("istio-system", "node-1", disable_safe_upgrade=True) is False
