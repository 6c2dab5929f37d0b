"""The enablement predicate, case by case (SPEC §2)."""

from __future__ import annotations

import pytest

from cni_plugin.enablement import Decision, EnablementPolicy, PodFacts, bypass_inbound, decide

AMB = {"istio.io/dataplane-mode": "ambient"}
NONE = {"istio.io/dataplane-mode": "none"}

CASES = [
    ("namespace labelled", PodFacts("bookinfo", namespace_labels=AMB), Decision.AMBIENT),
    ("pod labelled", PodFacts("bookinfo", labels=AMB), Decision.AMBIENT),
    ("nothing labelled", PodFacts("bookinfo"), Decision.NOT_LABELLED),
    (
        "other mode",
        PodFacts("b", namespace_labels={"istio.io/dataplane-mode": "x"}),
        Decision.NOT_LABELLED,
    ),
    ("opt out", PodFacts("b", labels=NONE, namespace_labels=AMB), Decision.OPTED_OUT),
    (
        "sidecar",
        PodFacts("b", annotations={"sidecar.istio.io/status": "{}"}, namespace_labels=AMB),
        Decision.SIDECAR,
    ),
    ("host network", PodFacts("b", host_network=True, namespace_labels=AMB), Decision.HOST_NETWORK),
    ("excluded", PodFacts("kube-system", namespace_labels=AMB), Decision.EXCLUDED_NAMESPACE),
    (
        "ztunnel",
        PodFacts("istio-system", labels={"app": "ztunnel"}, namespace_labels=AMB),
        Decision.ZTUNNEL,
    ),
    (
        "app=ztunnel elsewhere",
        PodFacts("b", labels={"app": "ztunnel"}, namespace_labels=AMB),
        Decision.AMBIENT,
    ),
]


@pytest.mark.parametrize(
    ("pod", "want"), [(p, w) for _, p, w in CASES], ids=[n for n, _, _ in CASES]
)
def test_decide(pod: PodFacts, want: Decision) -> None:
    got = decide(pod)
    assert got is want
    assert got.enabled == (want is Decision.AMBIENT)


def test_custom_exclusions() -> None:
    policy = EnablementPolicy(excluded_namespaces=("team-a",))
    assert decide(PodFacts("kube-system", namespace_labels=AMB), policy) is Decision.AMBIENT
    assert decide(PodFacts("team-a", namespace_labels=AMB), policy) is Decision.EXCLUDED_NAMESPACE


@pytest.mark.parametrize(
    ("value", "want"),
    [("true", True), ("True", True), ("false", False), ("", False), (None, False)],
)
def test_bypass_inbound(value: str | None, want: bool) -> None:
    ann = {} if value is None else {"ambient.istio.io/bypass-inbound-capture": value}
    assert bypass_inbound(ann) is want
