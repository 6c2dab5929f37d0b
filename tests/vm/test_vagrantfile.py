"""vagrant/Vagrantfile cannot boot here (no hardware virtualisation for stock kernels), so
it is evaluated by real Ruby under a recording stub of Vagrant's DSL: the VMs it defines,
their boxes, and that they provision with the README's `make setup` and run `make netns`.
Every inline shell script it carries must also parse under bash."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
VAGRANTFILE = REPO / "vagrant" / "Vagrantfile"

# A stand-in for Vagrant's configuration DSL that records every call (with nested blocks).
STUB = r"""
require "json"
class Rec
  attr_reader :calls
  def initialize; @calls = []; end
  def method_missing(name, *args, **kw, &blk)
    child = Rec.new
    @calls << { "name" => name.to_s, "args" => args, "kw" => kw.transform_keys(&:to_s),
                "children" => child.calls }
    blk.call(child) if blk
    child
  end
  def respond_to_missing?(*) = true
end
module Vagrant
  def self.configure(_version, &blk); $root = Rec.new; blk.call($root); end
end
Dir.chdir(File.dirname(ARGV[0])) { load File.basename(ARGV[0]) }
puts JSON.generate($root.calls)
"""

Call = dict[str, Any]


def _walk(calls: list[Call], path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Call]]:
    out = []
    for c in calls:
        here = (*path, c["name"])
        out.append((here, c))
        out.extend(_walk(c["children"], here))
    return out


@pytest.fixture(scope="module")
def calls(tmp_path_factory: pytest.TempPathFactory) -> list[Call]:
    ruby = shutil.which("ruby")
    if ruby is None:
        pytest.fail("ruby is missing: run `make setup` (scripts/apt-packages.d/vm.txt)")
    stub = tmp_path_factory.mktemp("vagrant") / "stub.rb"
    stub.write_text(STUB)
    proc = subprocess.run([ruby, str(stub), str(VAGRANTFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    result: list[Call] = json.loads(proc.stdout)
    return result


def _machines(calls: list[Call]) -> dict[str, list[tuple[tuple[str, ...], Call]]]:
    return {c["args"][0]: _walk(c["children"]) for p, c in _walk(calls) if p[-1] == "define"}


def test_four_distributions_with_stock_boxes(calls: list[Call]) -> None:
    machines = _machines(calls)
    assert set(machines) == {"ubuntu2204", "ubuntu2404", "debian12", "rocky9"}
    boxes = {
        name: [c["args"][0] for p, c in walk if p[-2:] == ("vm", "box=")]
        for name, walk in machines.items()
    }
    assert boxes == {
        "ubuntu2204": ["bento/ubuntu-22.04"],
        "ubuntu2404": ["bento/ubuntu-24.04"],
        "debian12": ["bento/debian-12"],
        "rocky9": ["bento/rockylinux-9"],
    }


def test_each_vm_provisions_with_make_setup_then_runs_the_netns_suite(
    calls: list[Call], tmp_path: Path
) -> None:
    synced = [c for p, c in _walk(calls) if p[-1] == "synced_folder" and c["args"][0] == ".."]
    assert len(synced) == 1, "the repository root is synced into the VM"
    guest_repo = synced[0]["args"][1]
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^setup:\n\t@?bash scripts/setup.sh", makefile, re.M)
    assert re.search(
        r'^netns: setup\n\tbash scripts/pytest.sh -m "netns and not chaos"', makefile, re.M
    )
    for name, walk in _machines(calls).items():
        scripts = [c["kw"]["inline"] for p, c in walk if p[-1] == "provision"]
        assert len(scripts) == 2, name
        last = scripts[-1]
        assert f"cd {guest_repo}" in last, name
        assert last.index("make setup") < last.index("make netns"), name
        for i, script in enumerate(scripts):
            f = tmp_path / f"{name}-{i}.sh"
            f.write_text(script)
            check = subprocess.run(["bash", "-n", str(f)], capture_output=True, text=True)
            assert check.returncode == 0, f"{name}: {check.stderr}"


def test_rhel_package_map_covers_the_netns_core() -> None:
    text = (REPO / "vagrant" / "rhel-packages.sh").read_text()
    mapped = set(re.findall(r"\[([a-z0-9.+-]+)\]=", text))
    core = {"iptables", "nftables", "iproute2", "python3-venv", "python3-bpfcc",
            "python3-nftables", "linux-headers-amd64", "conntrack", "ipset"}  # fmt: skip
    assert core <= mapped
    listed = set((REPO / "scripts" / "apt-packages.txt").read_text().split())
    assert core <= listed, "the map follows names the Debian list really uses"
