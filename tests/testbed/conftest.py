"""The testbed's fixtures (see :mod:`testbed.pytest_plugin`), for the tests in this directory."""

from testbed.pytest_plugin import kube_api, kube_namespace, testbed_info, testbed_node

__all__ = ["kube_api", "kube_namespace", "testbed_info", "testbed_node"]
