"""Property-based fuzzing of the parsers that take outside input (issue 14): the CNI
plugin's environment and stdin, conflists found on the node, and ZDS packets from a peer.

Each target gets a bounded number of generated inputs (hypothesis shrinks any failure to a
minimal example). The property is the documented error contract: only the module's own
error type comes out, never another exception, and the plugin always answers with exactly
one JSON document and never with an internal error.
"""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cni_plugin import cni_spec, plugin
from install import conflist
from node_agent import zds_wire

BOUNDED = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)
)
_json = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_ip = st.one_of(
    st.just({"address": "10.244.0.5/24", "gateway": "10.244.0.1"}),
    st.just({"address": "fd00::5/64", "interface": 0}),
    st.fixed_dictionaries({"address": st.text(max_size=20)}, optional={"version": _json}),
    _json,
)


@st.composite
def _plugin_configs(draw: st.DrawFn) -> bytes:
    """Mostly conflist-shaped JSON (so the deep paths run), sometimes any bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=200))
    conf: dict[str, Any] = {
        "cniVersion": draw(st.sampled_from(["0.3.1", "0.4.0", "1.0.0", "1.1.0", "9.9", ""])),
        "name": "k8s-pod-network",
        "type": "istio-cni",
        # ambient off: a fuzz run must not try to reach an agent or an API server.
        "ambient_enabled": draw(st.sampled_from([False, None, "yes"])),
        "cni_agent_run_dir": "/nonexistent/istio-cni",
    }
    extra = draw(st.dictionaries(st.sampled_from(sorted(cni_spec._FIELD_TYPES)), _json,
                                 max_size=3))  # fmt: skip
    extra.pop("cni_agent_run_dir", None)
    extra.pop("ambient_enabled", None)
    conf.update(extra)
    if draw(st.booleans()):
        conf["prevResult"] = {
            "cniVersion": "1.0.0",
            "interfaces": draw(st.lists(_json, max_size=2)),
            "ips": draw(st.lists(_ip, max_size=3)),
        }
    return json.dumps(conf).encode()


_env_text = st.text(alphabet=st.characters(blacklist_characters="\x00"), max_size=40)


@st.composite
def _plugin_envs(draw: st.DrawFn) -> dict[str, str]:
    env = {
        "CNI_COMMAND": draw(st.sampled_from([*cni_spec.COMMANDS, "add", ""]) | _env_text),
        "CNI_CONTAINERID": draw(st.sampled_from(["abc123", ""])),
        "CNI_NETNS": draw(st.sampled_from(["/var/run/netns/cni-1", ""]) | _env_text),
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/opt/cni/bin",
        "CNI_ARGS": draw(
            st.sampled_from(["", "IgnoreUnknown=1;K8S_POD_NAME=p;K8S_POD_NAMESPACE=ns"]) | _env_text
        ),
    }
    for key in draw(st.lists(st.sampled_from(sorted(env)), max_size=2)):
        env.pop(key, None)
    return env


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@BOUNDED
@given(env=_plugin_envs(), stdin=_plugin_configs())
def test_plugin_answers_every_input_with_one_documented_result(
    env: dict[str, str], stdin: bytes
) -> None:
    out, err = io.StringIO(), io.StringIO()
    rc = plugin.run(env, stdin, out, err)
    text = out.getvalue()
    assert rc in (0, 1)
    if not text:  # DEL, CHECK, STATUS, GC succeed silently
        assert rc == 0 and env.get("CNI_COMMAND") in ("DEL", "CHECK", "STATUS", "GC")
        return
    doc = json.loads(text)  # exactly one JSON document, nothing else on stdout
    assert isinstance(doc, dict)
    if rc == 1:
        assert doc["code"] != cni_spec.ERR_INTERNAL, doc["msg"]
        assert doc["msg"] and "Traceback" not in err.getvalue()


_conflist_like = st.one_of(
    st.binary(max_size=120),
    _json.map(lambda o: json.dumps(o).encode()),
    st.fixed_dictionaries(
        {"cniVersion": _json, "name": _json, "plugins": st.lists(_json, max_size=3) | _json},
        optional={"type": _json},
    ).map(lambda o: json.dumps(o).encode()),
)
_ENTRY = conflist.PluginEntry("info", "/var/run/istio-cni", True, "kube-system", "istio-cni")


@BOUNDED
@given(data=_conflist_like, name=st.sampled_from(["10-bridge.conflist", "10-bridge.conf"]))
def test_conflist_parsers_raise_only_conflist_errors(data: bytes, name: str) -> None:
    reason = conflist.validation_error(name, data)
    assert reason is None or isinstance(reason, str)
    conflist.has_entry(data, name)
    for op in (
        lambda: conflist.merge(data, name, _ENTRY),
        lambda: conflist.without_entry(data, name),
    ):
        try:
            op()
        except conflist.ConflistError as e:
            assert str(e)


@BOUNDED
@given(data=st.binary(max_size=64))
def test_zds_decoders_raise_only_protocol_errors(data: bytes) -> None:
    for decode in (zds_wire.decode_hello, zds_wire.decode_ack, zds_wire.decode_request):
        try:
            decode(data)
        except zds_wire.ZdsProtocolError as e:
            assert str(e)
