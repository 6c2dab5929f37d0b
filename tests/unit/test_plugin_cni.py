"""The plugin as the CNI spec sees it: versions, pass-through, and every malformed input
turning into CNI error JSON with the spec's code, a useful message, no traceback."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from cni_plugin import cni_spec
from cni_plugin.constants import SUPPORTED_CNI_VERSIONS
from tests.plugin_fakes import (
    cni_env,
    net_conf,
    plugin_form,  # noqa: F401  (autouse: source and built forms)
    run_plugin,
)


def _error(proc: Any) -> dict[str, Any]:
    assert proc.returncode != 0
    assert b"Traceback" not in proc.stderr and b"Traceback" not in proc.stdout
    doc = json.loads(proc.stdout)  # stdout holds exactly one JSON document
    assert set(doc) == {"cniVersion", "code", "msg", "details"}
    return dict(doc)


def test_version_lists_every_supported_version() -> None:
    proc = run_plugin({"CNI_COMMAND": "VERSION"}, b'{"cniVersion": "0.4.0"}')
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {
        "cniVersion": "0.4.0",
        "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"],
    }


@pytest.mark.parametrize("version", SUPPORTED_CNI_VERSIONS)
def test_add_passes_prev_result_through_in_the_config_version(version: str) -> None:
    conf = net_conf(version, ambient_enabled=False)
    proc = run_plugin(cni_env("ADD"), json.dumps(conf).encode())
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["cniVersion"] == version
    assert out["interfaces"] == conf["prevResult"]["interfaces"]
    assert out["routes"] == conf["prevResult"]["routes"]
    ip = out["ips"][0]
    assert ip["address"] == "10.244.1.5/24" and ip["gateway"] == "10.244.1.1"
    if version.startswith("0."):
        assert ip["version"] == "4"  # 0.3.x/0.4.0 results carry it
    else:
        assert "version" not in ip


def test_conversion_between_result_versions() -> None:
    v04 = {"cniVersion": "0.4.0", "ips": [{"version": "6", "address": "fd00::5/64"}]}
    assert cni_spec.convert_result(v04, "1.0.0")["ips"] == [{"address": "fd00::5/64"}]
    v1 = {"cniVersion": "1.0.0", "ips": [{"address": "fd00::5/64"}], "custom": 1}
    out = cni_spec.convert_result(v1, "0.3.1")
    assert out == {
        "cniVersion": "0.3.1",
        "ips": [{"address": "fd00::5/64", "version": "6"}],
        "custom": 1,
    }


def test_add_without_prev_result_prints_an_empty_result() -> None:
    conf = net_conf("1.1.0")
    del conf["prevResult"]
    conf["ambient_enabled"] = False
    proc = run_plugin(cni_env("ADD"), json.dumps(conf).encode())
    assert proc.returncode == 0
    assert json.loads(proc.stdout) == {"cniVersion": "1.1.0", "dns": {}}


@pytest.mark.parametrize("command", ["DEL", "CHECK", "STATUS", "GC"])
def test_other_commands_succeed_silently_and_repeatably(command: str, tmp_path: Any) -> None:
    # Ambient on and no agent nor API anywhere: these must still succeed, twice.
    conf = net_conf("1.1.0", cni_agent_run_dir=str(tmp_path))
    for _ in range(2):
        proc = run_plugin(cni_env(command), json.dumps(conf).encode())
        assert proc.returncode == 0, proc.stdout
        assert proc.stdout == b""
    assert os.listdir(tmp_path) == []


def test_del_without_netns_is_valid() -> None:
    env = cni_env("DEL")
    del env["CNI_NETNS"]
    proc = run_plugin(env, json.dumps(net_conf()).encode())
    assert proc.returncode == 0


MALFORMED_STDIN = [
    ("not json", b"{not json", 6, "not JSON"),
    ("empty", b"", 6, "empty network configuration"),
    ("array", b"[1, 2]", 6, "must be a JSON object"),
    ("no version", json.dumps({"name": "x", "type": "istio-cni"}).encode(), 7, "cniVersion"),
    ("unknown version", json.dumps(net_conf("0.2.0")).encode(), 1, "incompatible CNI version"),
    ("future version", json.dumps(net_conf("9.9.9")).encode(), 1, "0.3.0, 0.3.1"),
    (
        "wrong type bool",
        json.dumps(net_conf(ambient_enabled="yes")).encode(),
        7,
        "'ambient_enabled' must be true or false",
    ),
    (
        "wrong type list",
        json.dumps(net_conf(exclude_namespaces="kube-system")).encode(),
        7,
        "'exclude_namespaces'",
    ),
    (
        "wrong type run dir",
        json.dumps(net_conf(cni_agent_run_dir=5)).encode(),
        7,
        "'cni_agent_run_dir'",
    ),
    ("prevResult not object", json.dumps(net_conf(prevResult=[1])).encode(), 7, "'prevResult'"),
    (
        "prevResult bad ips",
        json.dumps(net_conf(prevResult={"ips": [{"address": "10.0.0.1"}]})).encode(),
        7,
        "CIDR",
    ),
]


@pytest.mark.parametrize(
    ("case", "stdin", "code", "words"), MALFORMED_STDIN, ids=[c[0] for c in MALFORMED_STDIN]
)
def test_malformed_stdin_is_a_cni_error(
    case: str, stdin: bytes, code: int, words: str, tmp_path: Any
) -> None:
    proc = run_plugin(cni_env("ADD"), stdin)
    err = _error(proc)
    assert err["code"] == code, err
    assert words in err["msg"], err


MALFORMED_ENV = [
    ("no command", {"CNI_COMMAND": None}, "CNI_COMMAND"),
    ("bad command", {"CNI_COMMAND": "ATTACH"}, "CNI_COMMAND"),
    ("no container id", {"CNI_CONTAINERID": None}, "CNI_CONTAINERID"),
    ("no netns", {"CNI_NETNS": None}, "CNI_NETNS"),
    ("no ifname", {"CNI_IFNAME": ""}, "CNI_IFNAME"),
    ("no path", {"CNI_PATH": None}, "CNI_PATH"),
    ("bad args", {"CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAME"}, "CNI_ARGS"),
]


@pytest.mark.parametrize(
    ("case", "change", "names"), MALFORMED_ENV, ids=[c[0] for c in MALFORMED_ENV]
)
def test_malformed_env_is_a_cni_error(case: str, change: dict[str, str | None], names: str) -> None:
    env = cni_env("ADD")
    for k, v in change.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    err = _error(run_plugin(env, json.dumps(net_conf()).encode()))
    assert err["code"] == 4, err
    assert names in err["msg"]


def test_errors_use_the_config_version_when_known() -> None:
    env = cni_env("ADD", CNI_ARGS="oops")
    err = _error(run_plugin(env, json.dumps(net_conf("0.4.0")).encode()))
    assert err["cniVersion"] == "0.4.0"


def test_logs_go_to_stderr_as_json_never_stdout() -> None:
    proc = run_plugin(cni_env("ADD"), b"{nope")
    assert proc.stdout.count(b"\n") == 0
    lines = [json.loads(line) for line in proc.stderr.splitlines()]
    assert lines and all({"level", "time", "msg"} <= set(rec) for rec in lines)
    assert lines[-1]["level"] == "error"
