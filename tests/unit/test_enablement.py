"""The enablement predicate, case by case (SPEC §2)."""

from __future__ import annotations

from typing import Any

import pytest

from cni_plugin.enablement import (
    DEFAULT_SELECTORS,
    Decision,
    EnablementPolicy,
    PodFacts,
    bypass_inbound,
    decide,
    namespace_matches,
    parse_selectors,
    selectors_to_json,
)
from cni_plugin.errors import ConfigError

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


# -- enablement selectors (Istio's cni/pkg/util: EnablementSelector, its podutil tests) -----

SIDECAR = {"sidecar.istio.io/status": "test"}

# Istio's TestEnablementSelectorMatches, over its default selectors: (name, pod, want).
ISTIO_CASES = [
    ("ambient mode enabled for namespace", PodFacts("test", namespace_labels=AMB), True),
    ("ambient mode enabled for pod", PodFacts("test", labels=AMB), True),
    (
        "enabled for both namespace and pod",
        PodFacts("test", labels=AMB, namespace_labels=AMB),
        True,
    ),
    ("enabled for neither namespace nor pod", PodFacts("test"), False),
    (
        "pod has sidecar and namespace has ambient enabled",
        PodFacts("test", annotations=SIDECAR, namespace_labels=AMB),
        False,
    ),
    (
        "pod opts out in an ambient namespace",
        PodFacts("test", labels=NONE, namespace_labels=AMB),
        False,
    ),
    (
        "pod has sidecar and the ambient label",
        PodFacts("test", labels=AMB, annotations=SIDECAR),
        False,
    ),
    (
        "hostNetwork pod in ambient-enabled namespace",
        PodFacts("test", host_network=True, namespace_labels=AMB),
        False,
    ),
    (
        "hostNetwork pod with the ambient label",
        PodFacts("test", labels=AMB, host_network=True),
        False,
    ),
]


@pytest.mark.parametrize(
    ("pod", "want"), [(p, w) for _, p, w in ISTIO_CASES], ids=[n for n, _, _ in ISTIO_CASES]
)
def test_default_selectors_decide_istios_cases(pod: PodFacts, want: bool) -> None:
    assert decide(pod).enabled is want
    # The default policy is exactly the selectors Istio's chart ships.
    assert EnablementPolicy().selectors == DEFAULT_SELECTORS


def test_default_selectors_are_istios_chart_default() -> None:
    # ambient.enablementSelectors in Istio's values.yaml, decoded as its ConfigMap carries it.
    chart_default: list[dict[str, Any]] = [
        {"podSelector": {"matchLabels": {"istio.io/dataplane-mode": "ambient"}}},
        {
            "podSelector": {
                "matchExpressions": [
                    {"key": "istio.io/dataplane-mode", "operator": "NotIn", "values": ["none"]}
                ]
            },
            "namespaceSelector": {"matchLabels": {"istio.io/dataplane-mode": "ambient"}},
        },
    ]
    assert parse_selectors(chart_default, "x") == DEFAULT_SELECTORS
    # Istio's JSON encoding: both selectors always present, empty fields left out.
    assert selectors_to_json(DEFAULT_SELECTORS) == [
        {"podSelector": chart_default[0]["podSelector"], "namespaceSelector": {}},
        {
            "podSelector": chart_default[1]["podSelector"],
            "namespaceSelector": chart_default[1]["namespaceSelector"],
        },
    ]


TEAM_SELECTORS = parse_selectors(
    [
        {"namespaceSelector": {"matchLabels": {"team": "payments"}}},
        {
            "podSelector": {
                "matchExpressions": [
                    {"key": "mesh", "operator": "In", "values": ["yes", "true"]},
                    {"key": "legacy", "operator": "DoesNotExist"},
                ]
            }
        },
    ],
    "test",
)


@pytest.mark.parametrize(
    ("pod", "want"),
    [
        (PodFacts("p", namespace_labels={"team": "payments"}), Decision.AMBIENT),
        # Custom selectors decide alone: the ambient label means nothing to them, and a
        # pod labelled none is enrolled when a selector matches it (as in Istio).
        (PodFacts("p", namespace_labels=AMB), Decision.NOT_SELECTED),
        (PodFacts("p", labels=AMB), Decision.NOT_SELECTED),
        (PodFacts("p", labels=NONE, namespace_labels={"team": "payments"}), Decision.AMBIENT),
        (PodFacts("p", labels={"mesh": "true"}), Decision.AMBIENT),
        (PodFacts("p", labels={"mesh": "no"}), Decision.NOT_SELECTED),
        (PodFacts("p", labels={"mesh": "yes", "legacy": ""}), Decision.NOT_SELECTED),
        # The rules selectors cannot override.
        (
            PodFacts("kube-system", namespace_labels={"team": "payments"}),
            Decision.EXCLUDED_NAMESPACE,
        ),
        (
            PodFacts("p", host_network=True, namespace_labels={"team": "payments"}),
            Decision.HOST_NETWORK,
        ),
        (
            PodFacts("p", annotations=SIDECAR, namespace_labels={"team": "payments"}),
            Decision.SIDECAR,
        ),
        (
            PodFacts("istio-system", labels={"app": "ztunnel", "mesh": "yes"}),
            Decision.ZTUNNEL,
        ),
    ],
)
def test_custom_selectors(pod: PodFacts, want: Decision) -> None:
    assert decide(pod, EnablementPolicy(selectors=TEAM_SELECTORS)) is want


def test_an_empty_list_selects_no_pod_and_empty_selectors_select_all() -> None:
    assert (
        decide(PodFacts("p", labels=AMB), EnablementPolicy(selectors=())) is Decision.NOT_SELECTED
    )
    everything = parse_selectors([{}], "x")
    assert decide(PodFacts("p"), EnablementPolicy(selectors=everything)) is Decision.AMBIENT


def test_namespace_matches_skips_empty_namespace_selectors() -> None:
    # Istio's MatchesNamespace: only non-empty namespace selectors count.
    assert namespace_matches(DEFAULT_SELECTORS, {}) == (False,)
    assert namespace_matches(DEFAULT_SELECTORS, AMB) == (True,)
    assert namespace_matches(TEAM_SELECTORS, {"team": "payments"}) == (True,)


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ({"podSelector": {}}, "must be a list"),
        (["x"], "each entry is a mapping"),
        ([{"podSelecter": {}}], "unknown field(s) podSelecter"),
        ([{"podSelector": {"matchLabel": {"a": "b"}}}], "unknown field(s) matchLabel"),
        ([{"podSelector": {"matchLabels": {"a": True}}}], "not a valid label value"),
        ([{"podSelector": {"matchLabels": {"bad key!": "b"}}}], "not a valid label key"),
        (
            [
                {
                    "podSelector": {
                        "matchExpressions": [{"key": "a", "operator": "in", "values": ["b"]}]
                    }
                }
            ],
            "operator 'in' is not one of In, NotIn, Exists, DoesNotExist",
        ),
        (
            [{"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}],
            "needs at least one value",
        ),
        (
            [
                {
                    "podSelector": {
                        "matchExpressions": [{"key": "a", "operator": "Exists", "values": ["b"]}]
                    }
                }
            ],
            "takes no values",
        ),
        ([{"namespaceSelector": {"matchExpressions": {"key": "a"}}}], "must be a list"),
    ],
)
def test_bad_selectors_are_one_clear_error_naming_the_place(raw: object, words: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_selectors(raw, "AMBIENT_ENABLEMENT_SELECTOR")
    assert words in str(e.value)
    assert str(e.value).startswith("AMBIENT_ENABLEMENT_SELECTOR")


def test_label_keys_and_values_follow_kubernetes_rules() -> None:
    good = [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "a-b_c.d", "x": ""}}}]
    assert parse_selectors(good, "x")[0].pod.matches({"app.kubernetes.io/name": "a-b_c.d", "x": ""})
    for key in ("-a", "a/", "/a", "UPPER.example/a", "a" * 64):
        with pytest.raises(ConfigError):
            parse_selectors([{"podSelector": {"matchLabels": {key: "v"}}}], "x")
