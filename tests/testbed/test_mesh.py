"""``up --mesh``: our installer, agent and ztunnel stand-in on the real node.

containerd runs the conflist our installer rewrote, so a pod in an ambient namespace goes
through bridge -> host-local -> portmap -> istio-cni, the plugin asks the agent, the agent
enrolls it; a pod outside stays untouched. Own instance (``icni-tb-mesh<pid>``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from cni_plugin import constants as c
from testbed import cleanup
from testbed.layout import Layout
from testbed.mesh import missing_pieces
from testbed.node import Testbed
from tests.testbed import pods as P

pytestmark = [pytest.mark.testbed, pytest.mark.timeout(1800)]


def test_mesh_enrolls_ambient_pods_only() -> None:
    if missing_pieces():
        pytest.skip(f"--mesh pieces not landed: {missing_pieces()}")
    lay = Layout.for_instance(f"mesh{os.getpid()}")
    bed = Testbed(lay)
    try:
        info = bed.up(mesh=True, backend="iptables")
        conflist = json.loads(Path(info["cni_conflist"]).read_text())
        assert conflist["plugins"][-1]["type"] == "istio-cni"
        assert (lay.cni_bin_dir / "istio-cni").exists()

        bed.kubectl("create", "namespace", "amb")
        bed.kubectl("label", "namespace", "amb", f"{c.DATAPLANE_MODE_LABEL}=ambient")
        bed.kubectl("create", "namespace", "plain")
        for ns in ("amb", "plain"):  # ServiceAccount admission needs the default account
            P.wait_service_account(bed, ns)
        image = info["images"]["httpd"]
        bed.kubectl("apply", "-f", "-", input=P.manifest("amb", [P.httpd_pod("web", image, 8080)]))
        bed.kubectl(
            "apply", "-f", "-", input=P.manifest("plain", [P.httpd_pod("web", image, 8080)])
        )
        P.wait_ready(bed, "amb", ["web"])
        P.wait_ready(bed, "plain", ["web"])

        def annotation(ns: str) -> str | None:
            pod = json.loads(bed.kubectl("get", "pod", "-n", ns, "web", "-o", "json").stdout)
            value: str | None = pod["metadata"].get("annotations", {}).get(c.REDIRECTION_ANNOTATION)
            return value

        deadline = time.monotonic() + 30
        while annotation("amb") != c.REDIRECTION_ENABLED:
            assert time.monotonic() < deadline, "ambient pod never annotated enabled"
            time.sleep(0.2)
        assert annotation("plain") is None
        log = (lay.logs_dir / "istio-cni-agent.log").read_text()
        assert '"pod enrolled"' in log and '"amb"' in log
    finally:
        problems = bed.down()
    assert problems == []
    assert cleanup.leftovers(lay) == []
