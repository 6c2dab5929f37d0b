"""The image's one package list drives both builds: ``install/Containerfile`` (users with a
registry) and ``testbed/agent_image.py`` (``make image``). The Containerfile's own shell
expressions are run on the list and must give what the builder installs and removes."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from testbed import agent_image as A

CONTAINERFILE = A.ROOT / "install" / "Containerfile"


def _runtime_stage() -> str:
    text = CONTAINERFILE.read_text()
    stages = re.split(r"^FROM ", text, flags=re.M)
    return stages[-1]


def _sed_expressions(stage: str) -> tuple[str, str]:
    """The two ``$(sed ...)`` command lines of the runtime stage: install, then remove."""
    found = re.findall(r"\$\((sed [^)]*)\)", stage)
    assert len(found) == 2, found
    return found[0], found[1]


def _run_sed(expr: str, packages: Path) -> list[str]:
    cmd = expr.replace("/tmp/packages.txt", str(packages))
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, check=True).stdout
    return out.split()


def test_containerfile_installs_exactly_the_builders_packages() -> None:
    stage = _runtime_stage()
    assert "COPY install/image/packages.txt /tmp/packages.txt" in stage
    install_expr, remove_expr = _sed_expressions(stage)
    want_install, want_remove = A.packages()
    assert _run_sed(install_expr, A.PACKAGES) == want_install
    assert _run_sed(remove_expr, A.PACKAGES) == want_remove
    # no package named outside the list in the runtime stage's apt-get line
    apt = stage[stage.index("apt-get install") : stage.index("$(sed")]
    assert re.sub(r"apt-get install|-y|--no-install-recommends|[\s\\]", "", apt) == ""


def test_the_list_has_what_every_backend_needs() -> None:
    install, remove = A.packages()
    assert {"python3.11", "iptables", "nftables", "python3-nftables", "ipset"} <= set(install)
    assert {"python3-bpfcc", "linux-headers-amd64"} <= set(install)  # the ebpf backend
    assert not set(install) & set(remove)


def test_a_changed_list_is_a_new_base_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = A.base_key()
    changed = tmp_path / "packages.txt"
    changed.write_text(A.PACKAGES.read_text() + "tcpdump\n")
    monkeypatch.setattr(A, "PACKAGES", changed)
    assert A.base_key() != before
    assert "tcpdump" in A.packages(changed)[0]


def test_the_containerfile_and_builder_lay_the_image_out_alike() -> None:
    text = CONTAINERFILE.read_text()
    assert f"COPY install/image/entrypoint.sh {A.ENTRYPOINT_IN_IMAGE}" in text
    assert f'ENTRYPOINT ["{A.ENTRYPOINT_IN_IMAGE}"]' in text
    assert f"ENV PATH={A.PATH_IN_IMAGE}" in text
    assert "python3.11 -m venv --system-site-packages /opt/istio-cni" in text
    copied = " ".join(re.findall(r"^COPY (?!--)(.*) \S+$", text, re.M)).split()
    assert set(A.WHEEL_INPUTS) <= set(copied), copied
