"""The reconciler's persisted state file (edge_agent/update/state.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_agent.update.state import AgentState, StateFile
from shared.errors import ConfigError
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


def test_a_damaged_state_file_is_kept_aside_and_said_so(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    for damage in (b'{"phase": "sideways"}', b"\xff\xfe\x00garbage", b'{"phase": "idle", "act', None):
        if damage is None:
            path.mkdir()  # a directory where the file was
        else:
            path.write_bytes(damage)
        f = StateFile(path)
        assert f.load() == AgentState() and f.recovered and not path.exists()
    # Each kept under a name of its own: a second damage does not overwrite the first.
    assert len(list(tmp_path.glob("state.json.corrupt-*"))) == 4
    assert not StateFile(path).recovered


def test_a_state_file_the_agent_may_not_read_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Starting afresh would overwrite a state the agent only lacks the permission to read.
    (The tests run as root, who reads any file: the refusal is raised at the read.)"""
    path = tmp_path / "state.json"
    path.write_text("{}")

    def refused(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refused)
    with pytest.raises(ConfigError, match="cannot be read: Permission denied"):
        StateFile(path).load()
    monkeypatch.undo()
    assert path.read_text() == "{}"
