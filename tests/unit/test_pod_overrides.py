"""A pod's annotations over the node's redirection settings, parsed as Istio parses them."""

from __future__ import annotations

from dataclasses import replace

import pytest

from cni_plugin.constants import BYPASS_INBOUND_ANNOTATION as BYPASS
from cni_plugin.constants import DNS_CAPTURE_ANNOTATION as DNS
from cni_plugin.constants import VIRTUAL_INTERFACES_ANNOTATION as VIRT
from cni_plugin.redirection.pod_overrides import PodOverrides, parse_go_bool, pod_settings
from cni_plugin.redirection.settings import RedirectSettings

NODE_ON = RedirectSettings(dns_capture=True)
NODE_OFF = replace(NODE_ON, dns_capture=False)


@pytest.mark.parametrize("value", ["1", "t", "T", "TRUE", "true", "True"])
def test_go_true_spellings(value: str) -> None:
    assert parse_go_bool(value) is True


@pytest.mark.parametrize("value", ["0", "f", "F", "FALSE", "false", "False"])
def test_go_false_spellings(value: str) -> None:
    assert parse_go_bool(value) is False


@pytest.mark.parametrize("value", ["", "yes", "no", "tRUE", " true", "true ", "2", "on"])
def test_other_spellings_are_errors_in_go(value: str) -> None:
    assert parse_go_bool(value) is None


@pytest.mark.parametrize(
    ("node", "annotation", "want"),
    [
        (NODE_OFF, "true", True),
        (NODE_ON, "false", False),
        (NODE_ON, "true", True),
        (NODE_OFF, "false", False),
        (NODE_ON, None, True),
        (NODE_OFF, None, False),
        (NODE_ON, "1", True),
        (NODE_ON, "F", False),
    ],
)
def test_pod_dns_capture_overrides_the_node(
    node: RedirectSettings, annotation: str | None, want: bool
) -> None:
    annotations = {} if annotation is None else {DNS: annotation}
    assert pod_settings(node, annotations).dns_capture is want


@pytest.mark.parametrize("node", [NODE_ON, NODE_OFF], ids=["node-on", "node-off"])
def test_unparsable_dns_annotation_keeps_the_node_setting_and_says_so(
    node: RedirectSettings,
) -> None:
    o = PodOverrides.from_annotations({DNS: "yes"})
    assert o.dns_capture is None
    assert o.applied_to(node).dns_capture is node.dns_capture
    assert len(o.problems) == 1 and DNS in o.problems[0] and "'yes'" in o.problems[0]


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("fake1s0f0,fake1s0f1", ("fake1s0f0", "fake1s0f1")),
        (" k6t-eth0 , tap0 ", ("k6t-eth0", "tap0")),
        ("a,,b,", ("a", "b")),
        ("", ()),
        (" , ", ()),
    ],
)
def test_virtual_interfaces_are_split_trimmed_and_ordered(raw: str, want: tuple[str, ...]) -> None:
    o = PodOverrides.from_annotations({VIRT: raw})
    assert o.virtual_interfaces == want and not o.problems
    assert o.applied_to(NODE_ON).virtual_interfaces == want


def test_bad_interface_names_are_kept_and_reported() -> None:
    o = PodOverrides.from_annotations({VIRT: "eth0,this-name-is-too-long"})
    assert o.virtual_interfaces == ("eth0", "this-name-is-too-long")
    assert len(o.problems) == 1 and "this-name-is-too-long" in o.problems[0]


def test_no_annotations_is_the_node_settings_unchanged() -> None:
    node = replace(NODE_ON, bypass_inbound=True, ipv6=False)
    assert pod_settings(node, {"unrelated": "x"}) == node


@pytest.mark.parametrize(
    ("value", "want"), [("true", True), ("1", True), ("T", True), ("false", False),
                        ("0", False), ("tRuE", False), ("yes", False), (None, False)]
)  # fmt: skip
def test_bypass_inbound_is_parsed_as_istio_parses_it(value: str | None, want: bool) -> None:
    annotations = {} if value is None else {BYPASS: value}
    assert pod_settings(NODE_ON, annotations).bypass_inbound is want


def test_every_override_at_once() -> None:
    s = pod_settings(NODE_OFF, {DNS: "True", BYPASS: "1", VIRT: "k6t-eth0"})
    assert (s.dns_capture, s.bypass_inbound, s.virtual_interfaces) == (True, True, ("k6t-eth0",))
    assert replace(s, dns_capture=False, bypass_inbound=False, virtual_interfaces=()) == NODE_OFF
