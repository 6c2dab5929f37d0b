"""LOG_LEVEL as Istio's ``--log_output_level`` (issue 14.9): scoped levels understood,
malformed ones refused in one line before any logger changes."""

from __future__ import annotations

import io
import json
import logging
import re

import pytest

from cni_plugin.errors import ConfigError
from node_agent import logs


@pytest.fixture(autouse=True)
def restore_logging() -> object:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield None
    root.handlers[:] = handlers
    root.setLevel(level)
    for name in set(logs.SCOPES.values()) - {""}:
        logging.getLogger(name).setLevel(logging.NOTSET)


def test_istio_scoped_levels() -> None:
    assert logs.parse_levels("info") == {"": logging.INFO}
    assert logs.parse_levels("default:info,cni:debug") == {
        "": logging.INFO,
        "node_agent": logging.DEBUG,
    }
    assert logs.parse_levels("none") == {"": logs.NONE}
    assert logs.parse_levels("WARN, install:error") == {
        "": logging.WARNING,
        "install": logging.ERROR,
    }
    assert logs.parse_levels("some-istiod-scope:debug") == {}  # unknown scopes: ignored
    assert set(logs.parse_levels("all:error").values()) == {logging.ERROR}


def test_scoped_level_applies_per_logger() -> None:
    out = io.StringIO()
    logs.configure("default:warn,zds:debug", out)
    logging.getLogger("node_agent.zds").debug("zds step")
    logging.getLogger("node_agent.controller").info("controller info")
    logging.getLogger("node_agent.controller").warning("controller warning")
    text = out.getvalue()
    assert "zds step" in text and "controller warning" in text
    assert "controller info" not in text
    logs.configure("none", out)
    logging.getLogger("node_agent.controller").error("silenced")
    assert "silenced" not in out.getvalue()


@pytest.mark.parametrize("bad", ["verbose", "default:info:x", "cni:", ",", "default:loud"])
def test_malformed_level_refused_in_one_line(bad: str) -> None:
    before = logging.getLogger().handlers[:]
    with pytest.raises(ConfigError) as e:
        logs.configure(bad)
    msg = str(e.value)
    assert "\n" not in msg and "scope:level" in msg and repr(bad[:80]) in msg
    assert logging.getLogger().handlers == before


def _agent_logs_for_chart(values: dict[str, object], monkeypatch: pytest.MonkeyPatch) -> str:
    """What the agent logs when started as the chart starts it: the DaemonSet's args parsed
    by ``istio-cni-agent run``'s own parser, the ConfigMap as its environment."""
    import argparse

    import yaml
    from helm_python.chart import Chart

    from install import render_manifests
    from node_agent import run_command

    with Chart.load(render_manifests.CHART) as chart:
        out = chart.render(values, name="istio-cni", namespace="istio-cni")
    ds = yaml.safe_load(out["istio-cni/templates/daemonset.yaml"])
    (container,) = ds["spec"]["template"]["spec"]["containers"]
    data = yaml.safe_load(out["istio-cni/templates/configmap.yaml"])["data"]
    for name, value in data.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("NODE_NAME", "node-1")  # the DaemonSet's downward API entry
    parser = argparse.ArgumentParser()
    run_command.add_arguments(parser)
    assert container["command"][-1] == "run"
    cfg = run_command.agent_config(parser.parse_args(container.get("args") or []))
    stream = io.StringIO()
    logs.configure(cfg.log_level, stream, as_json=cfg.log_as_json)
    pod = logs.PodLogger(logging.getLogger("node_agent.enrollment"), "demo", "web-1", "u-1")
    pod.info("pod enrolled", extra={"fields": {"backend": "iptables"}})
    logging.getLogger("node_agent.zds").debug("zds debug line")
    logging.getLogger("install").debug("install debug line")
    return stream.getvalue()


def test_global_log_as_json_false_gives_istios_text_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    text = _agent_logs_for_chart(
        {"global": {"logAsJson": False}, "logging": {"level": "default:info,cni:debug"}},
        monkeypatch,
    )
    lines = text.splitlines()
    # cni:debug reaches the agent's loggers (zds is one); install stays at default:info
    assert len(lines) == 2, text
    stamp, level, scope, msg, fields = lines[0].split("\t")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", stamp)
    assert (level, scope, msg) == ("info", "node_agent.enrollment", "pod enrolled")
    assert fields == "backend=iptables pod.namespace=demo pod.name=web-1 pod.uid=u-1"
    assert lines[1].split("\t")[1:] == ["debug", "node_agent.zds", "zds debug line"]
    with pytest.raises(json.JSONDecodeError):
        json.loads(lines[0])


def test_global_log_as_json_true_gives_json_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    text = _agent_logs_for_chart(
        {"global": {"logAsJson": True, "logging": {"level": "install:debug"}}}, monkeypatch
    )
    records = [json.loads(line) for line in text.splitlines()]
    assert [(r["level"], r["logger"], r["msg"]) for r in records] == [
        ("info", "node_agent.enrollment", "pod enrolled"),
        ("debug", "install", "install debug line"),
    ]
    assert records[0]["pod"] == {"namespace": "demo", "name": "web-1", "uid": "u-1"}
