"""The plugin's JSON codec behaves as ``json.loads`` / ``json.dumps`` (default arguments),
and the plugin's hot path never imports ``json`` (nor ``re``)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cni_plugin import json_codec
from tests.plugin_fakes import ROOT

DOCS = [
    {"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.5/16", "interface": 0}], "dns": {}},
    [1, 2.5, -3e-7, 1e300, True, False, None, "", 'é\u2028"\\/\n\t\x01', {"a": []}],
    "plain",
    12,
    {"nested": {"deep": [[[]], {}, {"k": "v"}]}, "unicode": "日本語 🙂"},
]


@pytest.mark.parametrize("doc", DOCS)
def test_round_trip_matches_json(doc: object) -> None:
    assert json_codec.dumps(doc) == json.dumps(doc)
    text = json.dumps(doc)
    assert json_codec.loads(text) == json.loads(text)
    assert json_codec.loads(text.encode()) == json.loads(text)
    assert json_codec.loads(f" \n\t{text}\r\n ") == doc


@pytest.mark.parametrize(
    "bad", ["", "   ", "{", '{"a": }', "[1, 2] x", "nul", '{"a" 1}', "\ufeff{}"]
)
def test_invalid_documents_raise_value_error(bad: str) -> None:
    with pytest.raises(ValueError):
        json.loads(bad)
    with pytest.raises(ValueError):
        json_codec.loads(bad)


def test_invalid_utf8_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        json_codec.loads(b"\xff\xfe{}")


def test_unserializable_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="not JSON serializable"):
        json_codec.dumps({"x": object()})


def test_hot_path_imports_neither_json_nor_re() -> None:
    code = (
        f"import sys; sys.path.insert(0, {ROOT!r}); import cni_plugin.plugin; "
        "print(sorted(m for m in ('json', 're', 'enum', 'ssl', 'socket', 'dataclasses') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True,
                         text=True, check=True).stdout.strip()  # fmt: skip
    # typing (imported by cni_plugin.constants) still brings re and enum; json must not come.
    assert "json" not in out and "ssl" not in out and "socket" not in out, out
