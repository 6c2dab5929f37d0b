"""Fixtures of the behaviour table: one backend per parameter, a fresh topology per test."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.behaviour.backends import BACKENDS, BackendCase
from tests.behaviour.topology import Topology, build


@pytest.fixture(params=BACKENDS, ids=[b.id for b in BACKENDS])
def backend_case(request: pytest.FixtureRequest) -> BackendCase:
    case: BackendCase = request.param
    reason = case.unavailable()
    if reason:
        pytest.skip(f"backend {case.id} unavailable on this machine: {reason}")
    return case


@pytest.fixture
def topology(make_netns: Callable[[str], str]) -> Iterator[Topology]:
    topo = build(make_netns)
    try:
        yield topo
    finally:
        topo.close()
