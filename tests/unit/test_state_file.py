"""The agent's state file writer (issue 14.9): root-only from creation, writes serialised
against ``stop()``, and a failing write never ends the writer thread."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

from node_agent.state import STATE_MODE, AgentState, StateExporter, read_state
from tests.agent_fakes import wait_for


def test_state_file_is_root_only_even_with_a_loose_umask_and_leftover(tmp_path: Path) -> None:
    path = tmp_path / "agent-state.json"
    (tmp_path / "agent-state.json.tmp").write_text("old")
    os.chmod(tmp_path / "agent-state.json.tmp", 0o666)
    old = os.umask(0)
    try:
        StateExporter(str(path), lambda: AgentState(node="n", backend="iptables")).write_now()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == STATE_MODE == 0o600
    assert read_state(str(path)).node == "n"


def test_writes_race_stop_without_tearing_and_survive_a_failing_source(tmp_path: Path) -> None:
    path = str(tmp_path / "agent-state.json")
    calls = {"n": 0}

    def collect() -> AgentState:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("a source bug")  # not an OSError
        return AgentState(node="n", backend="iptables")

    exp = StateExporter(path, collect, interval=0.001)
    exp.start()
    exp.touch()
    wait_for(lambda: calls["n"] >= 4, what="writer thread kept writing after the failure")
    assert exp.failures == 1
    errors: list[BaseException] = []

    def hammer() -> None:
        try:
            for _ in range(50):
                exp.write_now()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    exp.stop()
    for t in threads:
        t.join()
    assert errors == []
    with open(path) as f:
        assert json.load(f)["node"] == "n"
    assert not os.path.exists(path + ".tmp")
