"""The reconciler's persisted state file (edge_agent/update/state.py)."""

from __future__ import annotations

import json
from pathlib import Path

from edge_agent.update.state import AgentState, StateFile
from shared.messages import Phase


def test_a_state_file_round_trips(tmp_path: Path) -> None:
    f = StateFile(tmp_path / "state.json")
    assert f.load() == AgentState()
    f.save(AgentState(phase=Phase.SWITCHING, target_revision=4, active_slot="b"))
    assert f.load() == AgentState(phase=Phase.SWITCHING, target_revision=4, active_slot="b")


def test_a_state_file_from_before_the_switching_phase_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"phase": "rolling_back", "target_revision": 7, "active_slot": "a"}))
    state = StateFile(path).load()
    assert state.phase is Phase.SWITCHING and state.target_revision == 7 and path.exists()


def test_an_unreadable_state_file_is_kept_aside(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text('{"phase": "sideways"}')
    assert StateFile(path).load() == AgentState()
    assert (tmp_path / "state.corrupt").exists() and not path.exists()
