"""Staged rollouts: waves over a label selector, health gates, automatic rollback, one driver.

A rollout snapshots the matching devices at creation and splits them into waves (cumulative
percentages, devices ordered by a hash of their id so waves are stable and spread). The engine
drives the current wave each tick:

    pending ──(≤ max_concurrent at a time)──▶ updating ──▶ active ──(health window)──▶ healthy
                                                 │           └──────────────────────▶ failed
                                                 ├── device reports the update failed ▶ failed
                                                 └── no progress within wave_timeout ──▶ timed_out

A device is healthy when, over the health window after activation, its telemetry for the new
model has an error rate ≤ ``max_error_rate`` (or no worse than the previous model's) and its
median latency ≤ ``max_latency_ratio`` × the previous model's. A wave is done when none of its
devices is pending, updating or active; if more than ``failure_threshold`` of the devices that
answered failed, the rollout halts and that wave's devices are sent back to their previous
model. Timed-out (offline) devices are reported and do not block the wave.

Only one control-plane replica drives a rollout: each tick takes a lease on the rollout row
(an atomic conditional UPDATE), renewed while it drives and left to expire if it dies; on
PostgreSQL the row is also locked (``SELECT … FOR UPDATE``) for the length of a drive.

Modules: ``spec`` (states, the device transition table, the operator's spec and its bounds, wave
assignment), ``actions`` (operator actions and views), ``driver`` (the leased tick).
"""

from cloud.plane.rollouts.actions import Rollouts
from cloud.plane.rollouts.driver import RolloutDriver
from cloud.plane.rollouts.spec import (
    DEVICE_TRANSITIONS,
    DRIVEN,
    IN_USE,
    OPEN_DEVICE_STATES,
    TOUCHED_DEVICE_STATES,
    DeviceRow,
    DeviceState,
    IllegalTransition,
    RolloutRow,
    RolloutSpec,
    RolloutState,
    assign_waves,
)

__all__ = [
    "DEVICE_TRANSITIONS",
    "DRIVEN",
    "IN_USE",
    "OPEN_DEVICE_STATES",
    "TOUCHED_DEVICE_STATES",
    "DeviceRow",
    "DeviceState",
    "IllegalTransition",
    "RolloutDriver",
    "RolloutRow",
    "RolloutSpec",
    "RolloutState",
    "Rollouts",
    "assign_waves",
]
