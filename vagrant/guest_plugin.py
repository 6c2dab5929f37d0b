"""A pytest plugin loaded inside the guest (``-p vagrant.guest_plugin``): one JSON line per
test phase report, appended and flushed at once to ``$ICNI_VM_PROGRESS``.

JUnit XML is written only when pytest finishes; a run cut short by the runner's timeout
(or a guest that hangs) would otherwise bring nothing back. With this file the results
of every test that did finish, failures' tracebacks included, survive.
"""

from __future__ import annotations

import json
import os

import pytest


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    path = os.environ.get("ICNI_VM_PROGRESS")
    if not path:
        return
    if report.when != "call" and report.passed:
        return  # setup/teardown that passed says nothing the call does not
    record = {
        "nodeid": report.nodeid,
        "when": report.when,
        "outcome": report.outcome,
        "duration": round(report.duration, 3),
    }
    if report.failed:
        record["message"] = report.longreprtext[-3000:]
    elif report.skipped and isinstance(report.longrepr, tuple):
        record["message"] = str(report.longrepr[2])
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
