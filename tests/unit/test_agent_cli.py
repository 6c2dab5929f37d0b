"""``istio-cni-agent`` as an operator meets it: the top-level help lists every command with
its one-line help, ``--version``, and ``pods`` with kubectl's habits (-A/-n, -o
wide|json|yaml, --no-headers, columns padded as kubectl's tabwriter pads them). The
commands run in-process on a state file written the way the agent writes it."""

from __future__ import annotations

import importlib
import json
import os
from typing import Any

import pytest
import yaml

from node_agent import cli, pods_command
from node_agent.state import SCHEMA_VERSION, AgentState, state_path

PODS = [
    {"namespace": "shop", "name": "cart-7d9", "uid": "u-1", "ips": ["10.244.0.12"], "node": "n1",
     "state": "enabled", "decision": "ambient", "zds": "acked", "netns_inode": 4026532301},
    {"namespace": "default", "name": "web", "uid": "u-2", "ips": ["10.244.0.7"], "node": "n1",
     "state": "", "decision": "not_labelled"},
    {"namespace": "shop", "name": "a", "uid": "u-3", "ips": [], "node": "n1", "state": "",
     "decision": "opted_out"},
]  # fmt: skip


@pytest.fixture
def run_dir(tmp_path: Any) -> str:
    doc = AgentState.from_json(
        {"version": SCHEMA_VERSION, "node": "n1", "backend": "iptables", "pods": PODS}
    ).to_json()
    doc["pid"] = os.getpid()  # a live writer: no staleness warning
    with open(state_path(str(tmp_path)), "w") as f:
        json.dump(doc, f)
    return str(tmp_path)


def agent(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_help_lists_every_command_with_its_modules_one_line_help(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert set(cli.COMMAND_HELP) == set(cli.COMMANDS)
    for name, module in cli.COMMANDS.items():
        mod = importlib.import_module(module)
        assert cli.COMMAND_HELP[name] == getattr(mod, "HELP_FOR", {}).get(name, mod.HELP)
        (line,) = [ln for ln in out.splitlines() if ln.split()[:1] == [name]]
        assert line.split(None, 1)[1] == cli.COMMAND_HELP[name]
        assert "\n" not in cli.COMMAND_HELP[name]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib import metadata

    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"istio-cni-agent {metadata.version('istio-cni-py')} ")
    assert "Istio 1.24" in out


def test_an_unknown_command_names_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["nope"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'nope'" in err and "'pods'" in err


def test_pods_columns_are_padded_as_kubectl_pads_them(
    capsys: pytest.CaptureFixture[str], run_dir: str
) -> None:
    rc, out, _ = agent(capsys, "pods", "--run-dir", run_dir)
    assert rc == 0
    assert out.splitlines() == [
        "NAMESPACE   POD NAME   ADDRESS       NODE   PROTOCOL   BACKEND    STATE",
        "default     web        10.244.0.7    n1     TCP        -          not-ambient",
        "shop        a          -             n1     TCP        -          opted-out",
        "shop        cart-7d9   10.244.0.12   n1     HBONE      iptables   enabled",
    ]
    assert agent(capsys, "pods", "-A", "--run-dir", run_dir)[1] == out


def test_pods_in_one_namespace_wide_and_without_headers(
    capsys: pytest.CaptureFixture[str], run_dir: str
) -> None:
    _, out, _ = agent(
        capsys, "pods", "-n", "shop", "-o", "wide", "--no-headers", "--run-dir", run_dir
    )
    first = "a          -             n1   TCP     -          opted-out   opted_out   -       "
    second = "cart-7d9   10.244.0.12   n1   HBONE   iptables   enabled     ambient     acked   "
    assert out.splitlines() == [first + "-            u-3", second + "4026532301   u-1"]
    _, out, _ = agent(capsys, "pods", "-n", "shop", "--run-dir", run_dir)
    assert out.splitlines()[0].startswith("POD NAME   ADDRESS       NODE   ")


def test_pods_json_and_yaml_are_the_records(
    capsys: pytest.CaptureFixture[str], run_dir: str
) -> None:
    _, out, _ = agent(capsys, "pods", "-n", "shop", "-o", "json", "--run-dir", run_dir)
    as_json = json.loads(out)
    assert sorted(p["name"] for p in as_json) == ["a", "cart-7d9"]
    _, out, _ = agent(capsys, "pods", "-n", "shop", "-o", "yaml", "--run-dir", run_dir)
    assert yaml.safe_load(out) == as_json
    _, out, _ = agent(capsys, "pod", "shop/cart-7d9", "-o", "yaml", "--run-dir", run_dir)
    assert yaml.safe_load(out)["uid"] == "u-1"


def test_no_pods_is_a_note_on_stderr_as_kubectl(
    capsys: pytest.CaptureFixture[str], run_dir: str
) -> None:
    rc, out, err = agent(capsys, "pods", "-n", "empty", "--run-dir", run_dir)
    assert (rc, out) == (0, "")
    assert err.strip() == "No pods known to the agent in namespace empty."


def test_namespace_and_all_namespaces_exclude_each_other(
    capsys: pytest.CaptureFixture[str], run_dir: str
) -> None:
    with pytest.raises(SystemExit):
        cli.main(["pods", "-A", "-n", "shop", "--run-dir", run_dir])
    assert "not allowed with argument" in capsys.readouterr().err


def test_align_pads_all_but_the_last_column() -> None:
    assert (
        pods_command.align([("A", "BB", "C"), ("aaaa", "b", "")]) == "A      BB   C\naaaa   b    "
    )
