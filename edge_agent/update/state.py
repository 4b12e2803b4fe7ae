"""The reconciler's persisted state: written atomically before every step, read back after a crash."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shared.blobs import atomic_write
from shared.errors import ConfigError
from shared.messages import ErrorInfo, EvalReport, ModelRef, Phase

log = logging.getLogger(__name__)

SlotName = Literal["a", "b"]


def _empty_slots() -> dict[SlotName, ModelRef | None]:
    return {"a": None, "b": None}


class AgentState(BaseModel):
    model_config = ConfigDict(extra="forbid")

    phase: Phase = Phase.IDLE
    # The desired revision being worked on, and the last one fully applied.
    target_revision: int = -1
    applied_revision: int = -1
    # The newest desired revision accepted, whatever became of it (applied, being applied, failed
    # or superseded): anything older is a replay, even while the newer one has not applied.
    accepted_revision: int = -1
    target: ModelRef | None = None
    target_slot: SlotName | None = None
    # The desired state asking for ``target`` authorized a downgrade (a signed rollback).
    target_allow_downgrade: bool = False
    active_slot: SlotName | None = None
    slots: dict[SlotName, ModelRef | None] = Field(default_factory=lambda: _empty_slots())
    last_error: ErrorInfo | None = None
    # The pushed serving config in force (validated when accepted) and the revision it came with.
    config: dict[str, Any] = Field(default_factory=dict)
    config_revision: int = -1
    config_error: ErrorInfo | None = None
    config_error_revision: int | None = None
    # Anti-rollback: the highest manifest release installed per model name.
    releases: dict[str, int] = Field(default_factory=dict)
    # The counter of the last command obeyed (commands at or below it are replays).
    command_counter: int = -1
    # The last control message refused, and why (reported until a valid desired state arrives).
    control_error: ErrorInfo | None = None
    # The evaluation set's result for the model last staged and activated.
    evaluation: EvalReport | None = None

    @field_validator("phase", mode="before")
    @classmethod
    def _renamed_phase(cls, value: Any) -> Any:
        # State files written before wire schema v3 call a switch "rolling_back".
        return Phase.SWITCHING if value == "rolling_back" else value

    @property
    def revision_floor(self) -> int:
        """Desired revisions below this are stale (state files from before ``accepted_revision``
        still know the revision they applied and the one they last tried)."""
        return max(self.accepted_revision, self.applied_revision, self.target_revision)

    def standby_slot(self) -> SlotName:
        return "b" if self.active_slot == "a" else "a"

    @property
    def active_model(self) -> ModelRef | None:
        return self.slots.get(self.active_slot) if self.active_slot else None


class StateFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        # Set when ``load`` found a damaged file and set it aside: what the slots hold is all
        # that is left to go on.
        self.recovered = False

    def load(self) -> AgentState:
        """The saved state; a fresh one when there is none. A file that cannot be understood (a
        hand edit, a disk that lost sectors: atomic_write never leaves a torn one) is set aside
        under a name of its own and a fresh state returned; one that cannot be read at all
        (permissions) is a ConfigError: starting afresh would overwrite it."""
        try:
            return AgentState.model_validate(json.loads(self.path.read_bytes().decode("utf-8")))
        except FileNotFoundError:
            return AgentState()
        except PermissionError as exc:
            raise ConfigError(
                f"the agent's state file cannot be read: {exc.strerror}", path=str(self.path)
            ) from exc
        except (IsADirectoryError, UnicodeDecodeError, json.JSONDecodeError, ValidationError) as exc:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{time.time_ns()}")
            self.path.replace(aside)
            self.recovered = True
            log.error(
                "the agent's state file %s is damaged (%s); set aside as %s, starting from what the slots hold",
                self.path,
                type(exc).__name__,
                aside.name,
            )
            return AgentState()

    def save(self, state: AgentState) -> None:
        atomic_write(self.path, state.model_dump_json(indent=2).encode())
