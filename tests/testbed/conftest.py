"""The testbed's fixtures (see :mod:`testbed.pytest_plugin`), for the tests in this directory,
and a cold-cache Kubernetes build before the first ``testbed`` test of the session."""

import pytest

from testbed.pytest_plugin import kube_api, kube_namespace, prebuild, testbed_info, testbed_node

__all__ = ["kube_api", "kube_namespace", "testbed_info", "testbed_node"]


def pytest_collection_finish(session: pytest.Session) -> None:
    prebuild(session)
