"""pytest fixtures for tests that need the real single-node Kubernetes.

Use: ``from testbed.pytest_plugin import testbed_node, testbed_info, kube_api, kube_namespace``
in a ``conftest.py`` (or ``pytest_plugins = ["testbed.pytest_plugin"]`` in the root one) and
mark the tests ``@pytest.mark.testbed``.

- ``testbed_node`` (session): a :class:`~testbed.node.Testbed` that is up; brought up once per
  process however many conftests import it (reference-counted), always brought down at the
  end, and the teardown FAILS if anything is left behind (processes, mounts, cgroups, netns,
  files). Its instance is ``pytest<pid>`` (node ``icni-tb-pytest<pid>``) unless
  ``ISTIO_CNI_TESTBED_INSTANCE`` is set; leftovers of killed sessions are removed first.
  For fast iteration: ``istio-cni-testbed up`` once, then run pytest with
  ``ISTIO_CNI_TESTBED_INSTANCE=node``: a running node of that instance is used as it is and
  left running.
- ``testbed_info`` (session): the dict ``istio-cni-testbed up`` prints.
- ``kube_api`` (session): a ``kubernetes.client.ApiClient`` (admin).
- ``kube_namespace`` (function): a fresh namespace ``icni-tb-t-<hex>`` (with its default
  service account ready), deleted afterwards.

Bring-up is tens of seconds warm. A cold cache first builds Kubernetes (many minutes):
:func:`prebuild`, called from ``pytest_collection_finish`` in ``tests/testbed/conftest.py``,
does that before the first test when any ``testbed`` test is selected, outside per-test
timeouts, with its progress lines visible.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed import cleanup
from testbed.layout import Layout
from testbed.node import Testbed

_lock = threading.Lock()
_shared: dict[str, Any] = {"bed": None, "refs": 0, "owned": True}


def prebuild(session: pytest.Session) -> None:
    """Build (or find) the Kubernetes binaries and images before any test runs, when a
    ``testbed`` test is selected: a cold build takes minutes and must not count against a
    test's timeout. Capture is suspended so its progress lines show."""
    if session.config.option.collectonly or os.geteuid() != 0:
        return
    if not any(item.get_closest_marker("testbed") for item in session.items):
        return
    from testbed.build import CACHE_DIR, ensure_binaries, find_binaries
    from testbed.images import build_images

    if find_binaries(CACHE_DIR) is not None:
        return
    capman = session.config.pluginmanager.getplugin("capturemanager")
    with capman.global_and_fixture_disabled() if capman else contextlib.nullcontext():
        print("\ntestbed: building Kubernetes once (cached afterwards)...", flush=True)
        ensure_binaries(CACHE_DIR)
        build_images(CACHE_DIR / "images")


def session_instance() -> str:
    """This process's node instance: ``$ISTIO_CNI_TESTBED_INSTANCE`` or ``pytest<pid>``, so
    concurrent test sessions (and a node someone brought up by hand) never collide."""
    return os.environ.get("ISTIO_CNI_TESTBED_INSTANCE") or f"pytest{os.getpid()}"


def stale_session_instances() -> list[str]:
    """``pytest<pid>`` instances whose pid is gone (a killed session): safe to remove."""
    names: set[str] = set()
    candidates = [
        *Path("/var/tmp").glob("icni-tb-pytest*"),
        *Path("/run/netns").glob("icni-tb-pytest*"),
    ]
    for d in Layout().cgroup_dirs():
        candidates += list(d.parent.glob("icni-tb-pytest*"))
    for path in candidates:
        m = re.fullmatch(r"icni-tb-(pytest(\d+))(\.lock)?", path.name)
        if m and not Path(f"/proc/{m.group(2)}").exists():
            names.add(m.group(1))
    return sorted(names)


def acquire() -> Testbed:
    """The process-wide running node, brought up on first use."""
    with _lock:
        if _shared["bed"] is None:
            for stale in stale_session_instances():
                Testbed(Layout.for_instance(stale)).down()
            bed = Testbed(Layout.for_instance(session_instance()))
            if os.environ.get("ISTIO_CNI_TESTBED_INSTANCE") and bed.running():
                # A node brought up by hand for fast iteration: use it, leave it running.
                _shared["owned"] = False
            else:
                bed.up()
                _shared["owned"] = True
            _shared["bed"] = bed
        _shared["refs"] += 1
        node: Testbed = _shared["bed"]
        return node


def release() -> list[str]:
    """Drop one reference; the last one brings the node down. Returns what was left over."""
    with _lock:
        _shared["refs"] -= 1
        bed: Testbed | None = _shared["bed"]
        if _shared["refs"] > 0 or bed is None:
            return []
        _shared["bed"] = None
        if not _shared["owned"]:
            return []
        problems = bed.down()
        return problems + cleanup.leftovers(bed.layout)


@pytest.fixture(scope="session")
def testbed_node() -> Iterator[Testbed]:
    bed = acquire()
    try:
        yield bed
    finally:
        left = release()
        if left:
            pytest.fail(f"testbed down left things behind: {left}")


@pytest.fixture(scope="session")
def testbed_info(testbed_node: Testbed) -> dict[str, Any]:
    return testbed_node.info()


@pytest.fixture(scope="session")
def kube_api(testbed_node: Testbed) -> Any:
    return testbed_node.kube_client()


@pytest.fixture
def kube_namespace(kube_api: Any) -> Iterator[str]:
    from kubernetes import client

    core = client.CoreV1Api(kube_api)
    name = f"icni-tb-t-{secrets.token_hex(3)}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    deadline = time.monotonic() + 30
    while True:
        # ServiceAccount admission refuses pods until the controller-manager has made the
        # namespace's default account (tokens are projected at pod start: no Secret to wait for).
        accounts = core.list_namespaced_service_account(name).items
        if any(a.metadata and a.metadata.name == "default" for a in accounts):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"namespace {name} got no default service account in 30s")
        time.sleep(0.1)
    try:
        yield name
    finally:
        core.delete_namespace(name, grace_period_seconds=0)
