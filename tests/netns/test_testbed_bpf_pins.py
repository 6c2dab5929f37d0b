"""``istio-cni-testbed down`` removes the ebpf objects of its instance, crash or not: the
pin root is found by name (``Layout.bpf_pin_root``), not through a state file, and with
it go the programs, the NAT map and the getsockopt link on the host's cgroup root."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
from collections.abc import Callable

import pytest

from cni_plugin.redirection.settings import RedirectSettings
from testbed import cleanup
from testbed.layout import Layout
from tests.netns.bpf_support import CACHE_DIR, skip_if_unavailable

pytestmark = pytest.mark.netns


def _link_ids() -> set[int]:
    out = subprocess.run(["bpftool", "link", "-j"], capture_output=True, text=True, check=True)
    return {int(link["id"]) for link in json.loads(out.stdout or "[]")}


def test_down_after_a_crash_removes_the_instance_pins_and_cgroup_link(
    make_netns: Callable[[str], str],
) -> None:
    skip_if_unavailable()
    if shutil.which("bpftool") is None:
        pytest.skip("bpftool not installed (make setup installs it)")
    from cni_plugin.bpf.backend import EbpfBackend

    layout = Layout.for_instance(f"pt{secrets.token_hex(3)}")  # never brought up: no state
    root = layout.bpf_pin_root
    assert root.parent.as_posix() == "/sys/fs/bpf" and layout.node_name in root.name
    before = _link_ids()
    try:
        # What a crashed agent of that instance leaves: a pod enrolled, node objects pinned.
        EbpfBackend(pin_root=str(root), cache_dir=CACHE_DIR).apply(
            f"/run/netns/{make_netns('tbpins')}", RedirectSettings()
        )
        ours = _link_ids() - before
        assert ours, "the getsockopt link on the cgroup root was made"
        assert f"bpffs {root}" in cleanup.leftovers(layout)
        assert cleanup.teardown(layout) == []
        assert not root.exists() and cleanup.leftovers(layout) == []
        assert not (ours & _link_ids()), "the cgroup link went with its pin"
    finally:
        shutil.rmtree(root, ignore_errors=True)
