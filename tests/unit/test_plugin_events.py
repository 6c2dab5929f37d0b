"""Plugin-event server over its real unix socket: /cmdadd (SPEC §3 body), /log, /pod, 400s."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from cni_plugin.errors import ZtunnelUnavailableError
from node_agent.add_admission import AdmissionRefused
from node_agent.http_serving import BadRequest
from node_agent.plugin_events import PluginEventServer, parse_cmdadd
from node_agent.pod_controller import PluginAdd

BODY = {
    "Netns": "/var/run/netns/cni-1234",
    "PodName": "web-0",
    "PodNamespace": "shop",
    "IPs": [
        {
            "Interface": 0,
            "Address": {"IP": "10.244.1.5", "Mask": "////AA=="},
            "Gateway": "10.244.1.1",
        }
    ],
}


class _Conn(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=5)
        self.unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(self.unix_path)
        self.sock = s


def _req(path: str, method: str, url: str, body: bytes | None = None) -> tuple[int, str]:
    c = _Conn(path)
    try:
        c.request(method, url, body=body, headers={"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, r.read().decode()
    finally:
        c.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[PluginEventServer, list[Any]]]:
    calls: list[Any] = []

    def on_add(ev: PluginAdd) -> str:
        calls.append(ev)
        if ev.pod_name == "down":
            raise ZtunnelUnavailableError("no ztunnel is connected")
        if ev.pod_name == "intruder":
            raise AdmissionRefused("/var/run/netns/cni-1234 is the network namespace of pod a/b")
        return "enrolled"

    def status(ns: str, name: str) -> Mapping[str, Any]:
        return {"known": name == "web-0", "ambient": True, "reason": "ambient"}

    codes: list[int] = []
    s = PluginEventServer(
        str(tmp_path / "run" / "pluginevent.sock"), on_add, status, codes.append,
        log_socket_path=str(tmp_path / "run" / "log.sock"),
    )  # fmt: skip
    s.start()
    try:
        yield s, calls
    finally:
        s.stop()
    assert not (tmp_path / "run" / "pluginevent.sock").exists()
    assert not (tmp_path / "run" / "log.sock").exists()


def test_cmdadd_enrolls_before_replying(server: tuple[PluginEventServer, list[Any]]) -> None:
    s, calls = server
    code, text = _req(s.socket_path, "POST", "/cmdadd", json.dumps(BODY).encode())
    assert (code, text) == (200, "enrolled")
    assert calls == [PluginAdd("/var/run/netns/cni-1234", "web-0", "shop", ("10.244.1.5",))]


def test_cmdadd_failure_is_500_with_message(server: tuple[PluginEventServer, list[Any]]) -> None:
    s, _ = server
    code, text = _req(
        s.socket_path, "POST", "/cmdadd", json.dumps({**BODY, "PodName": "down"}).encode()
    )
    assert code == 500 and "no ztunnel is connected" in text and "shop/down" in text


def test_cmdadd_refused_is_400_with_reason(server: tuple[PluginEventServer, list[Any]]) -> None:
    s, _ = server
    body = json.dumps({**BODY, "PodName": "intruder"}).encode()
    code, text = _req(s.socket_path, "POST", "/cmdadd", body)
    assert (code, text) == (
        400,
        "refused: /var/run/netns/cni-1234 is the network namespace of pod a/b",
    )


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{not json", "not JSON"),
        (b"[]", "JSON object"),
        (json.dumps({**BODY, "PodName": ""}).encode(), "PodName"),
        (json.dumps({k: v for k, v in BODY.items() if k != "Netns"}).encode(), "Netns"),
        (json.dumps({**BODY, "IPs": "10.0.0.1"}).encode(), "IPs"),
        (json.dumps({**BODY, "IPs": [{"Address": {"IP": 5}}]}).encode(), "IPs[0]"),
        (
            json.dumps({**BODY, "IPs": [{"Address": {"IP": "1.2.3.4", "Mask": "%%"}}]}).encode(),
            "base64",
        ),
        (json.dumps({**BODY, "IPs": [{"Address": {"IP": "10.0.0.x"}}]}).encode(), "not an IP"),
    ],
)
def test_bad_bodies_get_400(
    server: tuple[PluginEventServer, list[Any]], body: bytes, needle: str
) -> None:
    s, calls = server
    code, text = _req(s.socket_path, "POST", "/cmdadd", body)
    assert code == 400 and needle in text
    assert calls == []


def test_log_and_pod_endpoints(
    server: tuple[PluginEventServer, list[Any]], caplog: pytest.LogCaptureFixture
) -> None:
    s, _ = server
    lines = [json.dumps({"level": "warn", "time": "t", "msg": "hello from plugin"})]
    with caplog.at_level("DEBUG", logger="node_agent.plugin"):
        assert _req(s.socket_path, "POST", "/log", json.dumps(lines).encode())[0] == 200
    assert any(r.getMessage() == "hello from plugin" for r in caplog.records)
    assert _req(s.socket_path, "POST", "/log", b"{}")[0] == 400
    assert s.log_socket_path is not None
    with caplog.at_level("DEBUG", logger="node_agent.plugin"):
        assert _req(s.log_socket_path, "POST", "/log", json.dumps(lines).encode())[0] == 200
    assert sum(r.getMessage() == "hello from plugin" for r in caplog.records) == 2
    code, text = _req(s.socket_path, "GET", "/pod?ns=shop&name=web-0")
    assert code == 200 and json.loads(text)["known"] is True
    assert _req(s.socket_path, "GET", "/pod?ns=shop")[0] == 400
    assert _req(s.socket_path, "POST", "/nope", b"{}")[0] == 404


def test_parse_accepts_null_interface_and_no_ips() -> None:
    ev = parse_cmdadd(json.dumps({**BODY, "IPs": None}).encode())
    assert ev.ips == ()
    with pytest.raises(BadRequest):
        parse_cmdadd(b"null")
