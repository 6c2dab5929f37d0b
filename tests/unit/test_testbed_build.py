"""testbed.build: the wrapper module it writes, the stamp, and its one-line errors for bad
input (no ``go``, a version the proxy does not serve, a malformed version)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from testbed import build
from testbed.build import BuildError, GoRecipe, GoTool

KUBE_GO_MOD = """module k8s.io/kubernetes

go 1.26.0

godebug default=go1.26

require (
\tk8s.io/api v0.0.0
\tk8s.io/client-go v0.0.0
\tgithub.com/spf13/cobra v1.10.0
)

replace (
\tk8s.io/api => ./staging/src/k8s.io/api
\tk8s.io/client-go => ./staging/src/k8s.io/client-go
)
"""


def test_wrapper_pins_every_staging_module_to_the_published_release() -> None:
    r = build.recipes("v1.36.3")[0]
    text = build._wrapper_go_mod(r, KUBE_GO_MOD)
    assert text == (
        "module icni-testbed/kubernetes\n\ngo 1.26.0\ngodebug default=go1.26\n\n"
        "require k8s.io/kubernetes v1.36.3\n\nreplace (\n"
        "\tk8s.io/api => k8s.io/api v0.36.3\n"
        "\tk8s.io/client-go => k8s.io/client-go v0.36.3\n)\n"
    )


def test_wrapper_without_staging_only_requires() -> None:
    r = GoRecipe("etcd", "go.etcd.io/etcd/server/v3", "v3.6.16", ())
    text = build._wrapper_go_mod(r, "module go.etcd.io/etcd/server/v3\n\ngo 1.25.0\n")
    assert text == (
        "module icni-testbed/etcd\n\ngo 1.25.0\n\nrequire go.etcd.io/etcd/server/v3 v3.6.16\n"
    )


def test_version_stamps_name_the_release_in_both_version_packages() -> None:
    flags = build._kube_ldflags("v1.36.3")
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        assert f"-X {pkg}.gitVersion=v1.36.3" in flags
        assert f"-X {pkg}.gitMinor=36" in flags


def test_stamp_changes_with_every_pinned_version() -> None:
    assert build.recipe("v1.36.3") != build.recipe("v1.36.1")
    assert f"go.etcd.io/etcd/server/v3@{build.ETCD_VERSION}" in build.recipe()


def test_minor_of_both_kinds_of_set() -> None:
    assert build.KubeBinaries("v1.36.3", Path("/x")).minor == 36
    assert build.KubeBinaries("1.20.5+really1.20.2-1.1+deb12u1", Path("/x")).minor == 20


def test_download_errors_say_what_is_missing() -> None:
    gone = build._download_error(
        "k8s.io/kubernetes",
        "v1.99.0",
        "go: k8s.io/kubernetes@v1.99.0: reading k8s.io/kubernetes/@v/v1.99.0.info: 404 Not Found",
    )
    assert gone.startswith("the Go module proxy does not serve k8s.io/kubernetes@v1.99.0")
    offline = build._download_error(
        "k8s.io/kubernetes", "v1.36.3", "dial tcp: lookup example.invalid: no such host"
    )
    assert offline.startswith("cannot reach the Go module proxy") and "\n" not in offline


def test_malformed_version_is_refused_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match=r"not of the form v1\.MINOR\.PATCH"):
        build.ensure_binaries(tmp_path, "v1.36")
    assert list(tmp_path.iterdir()) == []


def test_no_go_on_path_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BuildError) as e:
        GoTool(tmp_path)
    assert str(e.value).startswith("`go` not found on PATH") and "\n" not in str(e.value)


@pytest.mark.skipif(os.geteuid() != 0, reason="writes a module cache like the real build")
def test_unserved_module_version_stops_with_one_line(tmp_path: Path) -> None:
    """The real ``go`` asking the machine's configured proxy for a version that does not
    exist: one line naming the module, nothing half-built."""
    with pytest.raises(BuildError) as e:
        build.ensure_binaries(tmp_path, "v1.99.0")
    msg = str(e.value)
    assert msg.startswith("the Go module proxy does not serve k8s.io/kubernetes@v1.99.0"), msg
    assert "\n" not in msg
    assert not list(tmp_path.glob("kubernetes-*"))  # no set dir, no lock file


def test_flags_removed_since_1_20_are_only_given_to_the_1_20_set(tmp_path: Path) -> None:
    from testbed import daemons
    from testbed.layout import Layout
    from testbed.pki import Pki

    lay = Layout.for_instance("unit")
    p = tmp_path
    pki = Pki(
        p / "ca", p / "ca.key", p / "crt", p / "key", p / "sa", p / "sa.pub", p / "tok", "a", "n"
    )
    removed = {"--container-runtime=remote", "--insecure-port=0", "--port=0"}
    for bins, legacy in (
        (build.KubeBinaries("v1.36.3", tmp_path, etcd=str(tmp_path / "etcd")), False),
        (build.KubeBinaries("1.20.5+really1.20.2-1", tmp_path), True),
    ):
        argv = [
            *daemons.apiserver_argv(lay, bins, pki),
            *daemons.controller_manager_argv(lay, bins, pki),
            *daemons.scheduler_argv(lay, bins),
            *daemons.kubelet_argv(lay, bins, "pause:1"),
        ]
        assert bool(removed & set(argv)) == legacy
        assert any(a.startswith("--pod-infra-container-image") for a in argv) == legacy
        assert daemons.etcd_argv(lay, bins)[0] == ("etcd" if legacy else str(tmp_path / "etcd"))
        kubelet_conf = json.loads(lay.kubelet_config_json(bins.minor))
        # This machine's cgroups are hybrid (v1 controllers): kubelet >= 1.35 refuses them
        # unless told; 1.20 does not know the field.
        assert kubelet_conf.get("failCgroupV1", "absent") == ("absent" if legacy else False)


@pytest.mark.skipif(os.geteuid() != 0, reason="writes a module cache like the real build")
def test_no_way_to_the_proxy_stops_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real ``go`` with the proxy switched off (what an offline machine amounts to),
    asked for a module that is not in the (empty) module cache."""
    monkeypatch.setenv("GOPROXY", "off")
    with pytest.raises(BuildError) as e:
        GoTool(tmp_path).download("k8s.io/kubernetes", "v1.36.3", tmp_path)
    msg = str(e.value)
    assert msg.startswith("cannot reach the Go module proxy for k8s.io/kubernetes@v1.36.3"), msg
    assert "\n" not in msg
