"""What a rollout is: its states, a device's states within it and their transition table, the
operator's spec with its bounds, and how devices are split into waves."""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from cloud.plane.fleet import Selector
from cloud.plane.store import as_utc
from shared.errors import ContractError
from shared.messages import ModelRef


class RolloutState(StrEnum):
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    HALTED = "halted"
    ABORTED = "aborted"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"


DRIVEN = (RolloutState.RUNNING, RolloutState.ROLLING_BACK)
IN_USE = (RolloutState.RUNNING, RolloutState.PAUSED, RolloutState.ROLLING_BACK)


class DeviceState(StrEnum):
    """Where one device stands in a rollout.

    ::

        pending ──► updating ──► active ──► healthy
                        │           │
                        ├───────────┴──► failed, timed_out
        updating, active, healthy, failed ──► rolled_back   (the wave halted, or an operator)
    """

    PENDING = "pending"  # in a wave not reached yet, or waiting for a max_concurrent place
    UPDATING = "updating"  # its desired state names the target; not reported active yet
    ACTIVE = "active"  # runs the target; its health window is open
    HEALTHY = "healthy"
    FAILED = "failed"  # the update failed, or its health gate did
    TIMED_OUT = "timed_out"  # silent past the wave timeout (or too little traffic to judge)
    ROLLED_BACK = "rolled_back"  # sent back to its previous model


DEVICE_TRANSITIONS: dict[DeviceState, frozenset[DeviceState]] = {
    DeviceState.PENDING: frozenset({DeviceState.UPDATING}),
    DeviceState.UPDATING: frozenset(
        {DeviceState.ACTIVE, DeviceState.FAILED, DeviceState.TIMED_OUT, DeviceState.ROLLED_BACK}
    ),
    DeviceState.ACTIVE: frozenset(
        {DeviceState.HEALTHY, DeviceState.FAILED, DeviceState.TIMED_OUT, DeviceState.ROLLED_BACK}
    ),
    DeviceState.HEALTHY: frozenset({DeviceState.ROLLED_BACK}),
    DeviceState.FAILED: frozenset({DeviceState.ROLLED_BACK}),
    DeviceState.TIMED_OUT: frozenset(),
    DeviceState.ROLLED_BACK: frozenset(),
}
OPEN_DEVICE_STATES = (DeviceState.PENDING, DeviceState.UPDATING, DeviceState.ACTIVE)
# Devices a rollback sends to their previous model: every one this rollout may have changed.
TOUCHED_DEVICE_STATES = tuple(s for s, to in DEVICE_TRANSITIONS.items() if DeviceState.ROLLED_BACK in to)


@dataclass(frozen=True)
class RolloutRow:
    """A ``rollouts`` row as the driver reads it."""

    rollout_id: str
    tenant: str
    model: ModelRef
    state: RolloutState
    waves: tuple[float, ...]
    current_wave: int
    failure_threshold: float
    health_window_s: float
    wave_timeout_s: float
    max_concurrent: int
    max_error_rate: float
    max_latency_ratio: float
    allow_downgrade: bool
    min_samples: int
    max_eval_drop: float
    lease_owner: str | None
    devices_version: int

    @classmethod
    def from_row(cls, m: Any) -> RolloutRow:
        return cls(
            rollout_id=m["rollout_id"],
            tenant=m["tenant"],
            model=ModelRef.model_validate(m["model"]),
            state=RolloutState(m["state"]),
            waves=tuple(m["waves"]),
            current_wave=int(m["current_wave"]),
            failure_threshold=float(m["failure_threshold"]),
            health_window_s=float(m["health_window_s"]),
            wave_timeout_s=float(m["wave_timeout_s"]),
            max_concurrent=int(m["max_concurrent"]),
            max_error_rate=float(m["max_error_rate"]),
            max_latency_ratio=float(m["max_latency_ratio"]),
            allow_downgrade=bool(m["allow_downgrade"]),
            min_samples=int(m["min_samples"]),
            max_eval_drop=float(m["max_eval_drop"]),
            lease_owner=m["lease_owner"],
            devices_version=int(m["devices_version"]),
        )


@dataclass
class DeviceRow:
    """A ``rollout_devices`` row; the driver changes it as it writes the row."""

    device_id: str
    wave: int
    state: DeviceState
    previous_model: ModelRef | None
    desired_revision: int
    started_at: datetime | None
    active_at: datetime | None
    detail: str

    @classmethod
    def from_values(
        cls,
        device_id: str,
        wave: int,
        state: str,
        previous_json: str | None,
        desired_revision: int,
        started_at: datetime | None,
        active_at: datetime | None,
        detail: str,
    ) -> DeviceRow:
        """From the columns in this order, the previous model as its JSON text: what the driver
        reads of every device of a rollout each tick (10,000 rows of a large wave)."""
        return cls(
            device_id,
            int(wave),
            _DEVICE_STATES[state],
            _model_ref(previous_json) if previous_json else None,
            int(desired_revision),
            as_utc(started_at),
            as_utc(active_at),
            detail,
        )


_DEVICE_STATES = {s.value: s for s in DeviceState}


@functools.lru_cache(maxsize=4096)
def _model_ref(text: str) -> ModelRef | None:
    """A stored previous model, parsed once per distinct text: the devices of a wave mostly ran
    the same few models (a ModelRef is frozen, so rows can share one)."""
    data = json.loads(text)
    return ModelRef.model_validate(data) if data else None


class IllegalTransition(RuntimeError):
    """A driver bug: a device moved along an edge the transition table does not have."""


class ConcurrentDrive(RuntimeError):
    """Another replica drove the rollout while this one did (its lease ran out under a long
    tick): this drive rolls back, the next tick starts from what the other one wrote."""


# Bounds of a rollout's parameters: beyond them a number is a mistake (or an attack), and a driver
# tick must never meet a value it cannot compute with.
MAX_HEALTH_WINDOW_S = 7 * 24 * 3600.0
MAX_WAVE_TIMEOUT_S = 30 * 24 * 3600.0
MAX_CONCURRENT = 1_000_000
MAX_LATENCY_RATIO = 1000.0
MAX_WAVES = 100
MAX_MIN_SAMPLES = 1_000_000


@dataclass(frozen=True)
class RolloutSpec:
    model: ModelRef
    selector: str = ""
    waves: tuple[float, ...] = (10.0, 50.0, 100.0)
    failure_threshold: float = 0.2
    health_window_s: float = 60.0
    wave_timeout_s: float = 900.0
    max_concurrent: int = 100
    max_error_rate: float = 0.05
    max_latency_ratio: float = 3.0
    # The target may be a lower release than devices have installed: without this, devices
    # refuse the downgrade (anti-rollback) and the wave fails.
    allow_downgrade: bool = False
    # A device is judged on at least this many requests in its health window (0: on whatever
    # came, none included); with fewer its health is unknown and the wave waits.
    min_samples: int = 0
    # The quality gate: a device whose agreement with its package's evaluation set is more than
    # this below what the packager measured for the same graph fails (1: no quality gate).
    max_eval_drop: float = 0.05

    def validate(self) -> None:
        """ContractError (400) for anything a driver tick could not work with: non-finite numbers,
        durations or counts beyond the bounds below, inconsistent waves."""
        Selector.parse(self.selector)
        numbers = {
            "failure_threshold": self.failure_threshold,
            "health_window_s": self.health_window_s,
            "wave_timeout_s": self.wave_timeout_s,
            "max_error_rate": self.max_error_rate,
            "max_latency_ratio": self.max_latency_ratio,
            "max_eval_drop": self.max_eval_drop,
        }
        for name, value in numbers.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ContractError(f"{name} must be a finite number", value=value)
        if self.health_window_s > MAX_HEALTH_WINDOW_S or self.wave_timeout_s > MAX_WAVE_TIMEOUT_S:
            raise ContractError(
                f"health_window_s is at most {MAX_HEALTH_WINDOW_S:.0f} s and wave_timeout_s at most "
                f"{MAX_WAVE_TIMEOUT_S:.0f} s",
                health_window_s=self.health_window_s,
                wave_timeout_s=self.wave_timeout_s,
            )
        if isinstance(self.max_concurrent, bool) or not isinstance(self.max_concurrent, int):
            raise ContractError("max_concurrent must be an integer", value=self.max_concurrent)
        if isinstance(self.min_samples, bool) or not isinstance(self.min_samples, int):
            raise ContractError("min_samples must be an integer", value=self.min_samples)
        if not 0 <= self.min_samples <= MAX_MIN_SAMPLES:
            raise ContractError(f"min_samples is in [0, {MAX_MIN_SAMPLES}]", value=self.min_samples)
        if self.max_concurrent > MAX_CONCURRENT or self.max_latency_ratio > MAX_LATENCY_RATIO:
            raise ContractError(
                f"max_concurrent is at most {MAX_CONCURRENT} and max_latency_ratio at most {MAX_LATENCY_RATIO:.0f}",
                max_concurrent=self.max_concurrent,
                max_latency_ratio=self.max_latency_ratio,
            )
        waves = list(self.waves)
        if len(waves) > MAX_WAVES or not all(math.isfinite(w) for w in waves):
            raise ContractError(
                f"at most {MAX_WAVES} waves, each a finite percentage", waves=waves[:MAX_WAVES]
            )
        if not waves or any(not 0 < w <= 100 for w in waves) or waves != sorted(set(waves)):
            raise ContractError("waves are increasing cumulative percentages in (0, 100]", waves=waves)
        if waves[-1] != 100:
            raise ContractError("the last wave must reach 100%", waves=waves)
        if not 0 <= self.failure_threshold < 1:
            raise ContractError("failure_threshold is a fraction in [0, 1)", value=self.failure_threshold)
        if self.health_window_s < 0 or self.wave_timeout_s <= 0 or self.max_concurrent < 1:
            raise ContractError("health_window_s ≥ 0, wave_timeout_s > 0 and max_concurrent ≥ 1 are required")
        if not 0 <= self.max_eval_drop <= 1:
            raise ContractError("max_eval_drop is a fraction in [0, 1]", value=self.max_eval_drop)
        if not 0 <= self.max_error_rate <= 1 or self.max_latency_ratio < 1:
            raise ContractError("max_error_rate in [0, 1] and max_latency_ratio ≥ 1 are required")


def _order_key(device_id: str) -> str:
    return hashlib.sha256(device_id.encode()).hexdigest()


def assign_waves(device_ids: list[str], waves: tuple[float, ...]) -> dict[str, int]:
    """Cumulative percentages → wave index per device; every wave gets at least one device
    while devices remain."""
    ordered = sorted(device_ids, key=_order_key)
    n = len(ordered)
    out: dict[str, int] = {}
    start = 0
    for i, pct in enumerate(waves):
        end = n if i == len(waves) - 1 else max(start + 1, -(-int(pct * n) // 100))
        for d in ordered[start : min(end, n)]:
            out[d] = i
        start = min(end, n)
    return out
