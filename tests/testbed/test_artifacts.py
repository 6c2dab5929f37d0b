"""Pure pieces of the testbed (no node needed): deb-src derivation, OCI archives, layout."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import pytest

from testbed import build_debian
from testbed.images import write_oci_tar
from testbed.layout import Layout


def test_deb_src_is_added_to_every_stanza(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "sources.list.d"
    src.mkdir()
    (src / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.invalid/debian\nSuites: bookworm\nComponents: main\n\n"
        "Types: deb deb-src\nURIs: http://mirror.invalid/security\nSuites: bookworm-security\n"
    )
    real_path = Path

    def fake_path(p: str) -> Path:
        return src if p == "/etc/apt/sources.list.d" else real_path(p)

    monkeypatch.setattr(build_debian, "Path", fake_path)
    out = build_debian._sources_with_deb_src()
    assert out.count("Types: deb deb-src") == 2
    assert "deb-src deb-src" not in out
    # The machine's URIs are carried over at run time, never written into the repository.
    assert "http://mirror.invalid/debian" in out


def test_oci_archive_is_consistent_and_deterministic(tmp_path: Path) -> None:
    entries: dict[str, tuple[int, bytes | str]] = {
        "bin/tool": (0o755, b"\x7fELF..."),
        "bin/alias": (0, "tool"),
    }
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    for out in (a, b):
        write_oci_tar(out, "icni-tb.local/x:1", entries, {"Entrypoint": ["/bin/tool"]})
    assert a.read_bytes() == b.read_bytes()
    with tarfile.open(a) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]
    for name, data in files.items():
        if name.startswith("blobs/sha256/"):
            assert hashlib.sha256(data).hexdigest() == name.rsplit("/", 1)[1]
    index = json.loads(files["index.json"])
    desc = index["manifests"][0]
    assert desc["annotations"]["io.containerd.image.name"] == "icni-tb.local/x:1"
    manifest = json.loads(files["blobs/" + desc["digest"].replace(":", "/")])
    assert manifest["layers"][0]["mediaType"].endswith("tar+gzip")


def test_instances_never_share_names() -> None:
    default, other = Layout.for_instance("node"), Layout.for_instance("pytest42")
    assert default.node_name == "icni-tb-node"
    assert other.node_name == other.netns_name == "icni-tb-pytest42"
    assert other.cgroup_root == "/icni-tb-pytest42"
    assert other.state_dir != default.state_dir
    assert not str(other.state_dir).startswith(str(default.state_dir) + "/")
    with pytest.raises(ValueError):
        Layout.for_instance("Bad_Name")


def test_mesh_hook_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    from node_agent import cli
    from testbed import mesh

    monkeypatch.setattr(cli, "COMMANDS", {"run": "node_agent.run_command"})
    monkeypatch.setattr(mesh, "STANDIN_MODULE", "testbed.no_such_standin")
    missing = mesh.missing_pieces()
    assert any("istio-cni-agent install" in m for m in missing)
    assert any("testbed.no_such_standin" in m for m in missing)
    with pytest.raises(mesh.MeshUnavailable, match="istio-cni-agent install"):
        mesh.start_mesh(None, {}, "iptables")  # type: ignore[arg-type]
