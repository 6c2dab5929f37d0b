"""The Istio peer build's pure parts: the throwaway module it generates, the one-line
explanations of go failures, and the cache lookup that decides whether to build."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import istio_peer as peer


def test_module_requires_exactly_the_version_and_pins_both_commands() -> None:
    files = peer.module_files(peer.DEFAULT_VERSION)
    assert set(files) == {"go.mod", "tools.go", "inpodrules/main.go"}
    gomod = files["go.mod"].splitlines()
    assert f"require istio.io/istio {peer.DEFAULT_VERSION}" in gomod
    assert not [line for line in gomod if "replace" in line]
    tools = files["tools.go"]
    assert tools.startswith("//go:build tools\n")
    assert '_ "istio.io/istio/cni/cmd/istio-cni"' in tools
    assert '_ "istio.io/istio/cni/cmd/install-cni"' in tools
    # The driver runs Istio's own rule code the way the agent's AddPodToMesh does.
    driver = files["inpodrules/main.go"]
    for call in ("nodeagent.OpenNetns", "nodeagent.NetnsDo", "CreateInpodRules(log"):
        assert call in driver


@pytest.mark.parametrize("bad", ["", "latest; rm -rf /", "1.28.0", "v1.2", "main"])
def test_a_malformed_version_is_one_clear_error(bad: str) -> None:
    with pytest.raises(peer.PeerBuildError, match="is not a Go module version"):
        peer.module_files(bad)


V = "v0.0.0-20990101000000-000000000000"


@pytest.mark.parametrize(
    ("stderr", "expected"),
    [
        (
            f"go: istio.io/istio@{V}: invalid version: unknown revision 000000000000",
            "is not served by the configured Go module proxy",
        ),
        (
            f"go: module istio.io/istio@{V} found, but does not contain package\n"
            f"tools.go:5:2: module istio.io/istio@{V} provides no package "
            "istio.io/istio/cni/cmd/istio-cni",
            "has no package istio.io/istio/cni/cmd/istio-cni",
        ),
        (
            "go: istio.io/istio@v1 requires go >= 1.99 (running go 1.26.8; GOTOOLCHAIN=local)",
            "needs a newer Go",
        ),
        ("dial tcp: lookup proxy: i/o timeout", "could not be reached"),
        ("something else entirely", "go failed for istio.io/istio@"),
    ],
)
def test_go_failures_become_one_line_naming_the_fix(stderr: str, expected: str) -> None:
    line = peer.explain_go_failure(V, stderr)
    assert expected in line
    assert "\n" not in line


def _fake_build(cache: Path, version: str, recipe: str, names: list[str]) -> None:
    work = peer.peer_dir(version, cache)
    (work / "bin").mkdir(parents=True)
    for n in names:
        (work / "bin" / n).write_text("")
    (work / "built.json").write_text(json.dumps({"recipe": recipe, "version": version}))


def test_cache_hit_needs_the_current_recipe_and_every_binary(tmp_path: Path) -> None:
    all_names = [*peer.COMMANDS, peer.DRIVER]
    _fake_build(tmp_path, V, peer.RECIPE, all_names)
    found = peer.find_peer(V, tmp_path)
    assert found is not None and found.path("install-cni").parent == found.bin_dir
    _fake_build(tmp_path / "stale", V, "v0:old-driver", all_names)
    assert peer.find_peer(V, tmp_path / "stale") is None
    _fake_build(tmp_path / "partial", V, peer.RECIPE, all_names[:1])
    assert peer.find_peer(V, tmp_path / "partial") is None
    assert peer.find_peer(V, tmp_path / "empty") is None
