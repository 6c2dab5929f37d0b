"""Property-based fuzzing of the parsers that take outside input (issue 14): the CNI
plugin's environment and stdin, conflists found on the node, ZDS packets from a peer, and
plugin-event ``/cmdadd`` bodies (parser and real server).

Each target gets a bounded number of generated inputs (hypothesis shrinks any failure to a
minimal example). The property is the documented error contract: only the module's own
error type comes out, never another exception, and the plugin always answers with exactly
one JSON document and never with an internal error.
"""

from __future__ import annotations

import io
import ipaddress
import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cni_plugin import cni_spec, plugin
from install import conflist
from node_agent import zds_wire
from node_agent.http_serving import BadRequest
from node_agent.plugin_events import PluginEventServer, parse_cmdadd

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


_addr = st.one_of(
    st.sampled_from(["10.244.1.5", "fd00::5", "::", "10.0.0.x", "", "1.2.3.4.5"]),
    st.text(max_size=20),
    _json,
)
_cmdadd_ip = st.one_of(
    st.fixed_dictionaries(
        {"Address": st.fixed_dictionaries({"IP": _addr}, optional={"Mask": _json | st.text()})},
        optional={"Interface": _json, "Gateway": _json},
    ),
    _json,
)


@st.composite
def _cmdadd_bodies(draw: st.DrawFn) -> bytes:
    """Mostly /cmdadd-shaped JSON (SPEC §3), sometimes any bytes or deeply nested JSON."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=200))
    if kind == 1:
        depth = draw(st.integers(1, 5_000))
        return draw(st.sampled_from([b"[", b'{"a":'])) * depth
    doc: dict[str, Any] = {
        "Netns": draw(st.sampled_from(["/var/run/netns/cni-1", "", 7, None])),
        "PodName": draw(st.sampled_from(["web-0", "", None, ["x"]])),
        "PodNamespace": draw(st.sampled_from(["shop", "", 1.5])),
        "IPs": draw(st.lists(_cmdadd_ip, max_size=3) | _json),
    }
    for key in draw(st.lists(st.sampled_from(sorted(doc)), max_size=2)):
        doc.pop(key, None)
    return json.dumps(doc).encode()


@BOUNDED
@given(body=_cmdadd_bodies())
def test_cmdadd_parser_accepts_valid_bodies_and_refuses_others_with_a_400(body: bytes) -> None:
    """The plugin-event request parser: a parsed ADD names strings and IP addresses only;
    anything else is the documented BadRequest (400) with a one-line reason."""
    try:
        event = parse_cmdadd(body)
    except BadRequest as e:
        assert e.code == 400 and str(e) and "\n" not in str(e)
        return
    assert all(isinstance(v, str) and v for v in (event.netns, event.pod_name, event.pod_namespace))
    for ip in event.ips:
        ipaddress.ip_address(ip)


_DOCUMENTED = {200, 400, 404, 408, 411, 413}


@pytest.fixture(scope="module")
def plugin_socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = str(tmp_path_factory.mktemp("fuzz") / "pluginevent.sock")
    server = PluginEventServer(
        path, lambda ev: "enrolled", lambda ns, name: {"known": False}, read_timeout=0.2
    )
    server.start()
    yield path
    server.stop()


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    body=_cmdadd_bodies(),
    length=st.one_of(st.none(), st.just("exact"), st.sampled_from(["-1", "abc", "1e3", "0x10"])),
    path=st.sampled_from(["/cmdadd", "/log", "/nope"]),
)
def test_plugin_event_server_answers_only_documented_statuses(
    plugin_socket: str, body: bytes, length: str | None, path: str
) -> None:
    """The same bodies through the real server, with good and bad Content-Lengths: every
    answer is one of the documented statuses with a one-line reason, never silence."""
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\n"
    if length is not None:
        head += f"Content-Length: {len(body) if length == 'exact' else length}\r\n"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    try:
        s.connect(plugin_socket)
        s.sendall(head.encode() + b"\r\n" + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            assert chunk, "the server closed without an answer"
            data += chunk
    finally:
        s.close()
    status_line, _, rest = data.partition(b"\r\n")
    status = int(status_line.split()[1])
    assert status in _DOCUMENTED, data[:200]
    reason = rest.partition(b"\r\n\r\n")[2].decode(errors="replace")
    assert "\n" not in reason.strip()
