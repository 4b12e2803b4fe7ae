"""The rollout driver's decisions (cloud/plane/rollouts/driver.py) on a fake clock, one scenario each:
SQLite in a temporary folder, devices and telemetry written through the fleet's own methods.
The same driver against real agents and processes: tests/test_control_plane.py."""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, update

from cloud.plane.fleet import Fleet
from cloud.plane.rollouts import (
    DEVICE_TRANSITIONS,
    TOUCHED_DEVICE_STATES,
    DeviceRow,
    DeviceState,
    IllegalTransition,
    RolloutDriver,
    Rollouts,
    RolloutSpec,
)
from cloud.plane.store import devices, make_engine, migrate, rollouts
from shared.errors import Conflict, ContractError
from shared.messages import EvalReport, ModelRef, Phase, ReportedState, TelemetryBatch, TelemetryRecord

TENANT = "t"


def ref(version: str) -> ModelRef:
    digest = "sha256:" + hashlib.sha256(version.encode()).hexdigest()
    return ModelRef(name="m", version=version, manifest_digest=digest, manifest_size=100)


OLD, NEW = ref("1"), ref("2")


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class Fleetlet:
    """Four devices on model m:1, the driver, and ways to make devices answer."""

    def __init__(self, url: str, n: int = 4) -> None:
        self.clock = Clock()
        self.engine = make_engine(url)
        migrate(self.engine)
        self.fleet = Fleet(self.engine, clock=self.clock)
        self.rollouts = Rollouts(self.engine, self.fleet)
        self.driver = RolloutDriver(self.engine, self.fleet, owner="test", lease_s=30, clock=self.clock)
        self.devices = [f"d{i}" for i in range(n)]
        for d in self.devices:
            self.fleet.record_reported(
                TENANT,
                ReportedState(device_id=d, revision=0, phase=Phase.ACTIVE, active_slot="a", slots={"a": OLD}),
            )

    def start(self, **spec: object) -> str:
        fields = {"waves": (50.0, 100.0), "health_window_s": 60.0, "max_concurrent": 10, **spec}
        return str(self.rollouts.create(TENANT, RolloutSpec(model=NEW, **fields))["rollout_id"])  # type: ignore[arg-type]

    def states(self, rid: str) -> dict[str, str]:
        return {d["device_id"]: d["state"] for d in self.rollouts.show(TENANT, rid)["devices"]}

    def rollout_state(self, rid: str) -> str:
        return str(self.rollouts.show(TENANT, rid)["state"])

    def activate(self, device: str, evaluation: EvalReport | None = None) -> None:
        """The device reports the new model active at its latest desired revision."""
        desired = self.fleet.current_desired(TENANT, device)
        assert desired is not None
        self.fleet.record_reported(
            TENANT,
            ReportedState(
                device_id=device,
                revision=desired.revision,
                phase=Phase.ACTIVE,
                active_slot="b",
                slots={"a": OLD, "b": NEW},
                evaluation=evaluation,
            ),
        )

    def first_wave_active(self) -> tuple[str, list[str]]:
        """A rollout started, its first wave's devices updating and then reporting it active
        (the driver has not seen the reports yet)."""
        rid = self.start()
        self.driver.tick()
        first = self.updating(rid)
        for d in first:
            self.activate(d)
        return rid, first

    def serving(self, devices: list[str], ok: int = 5) -> None:
        """The devices report the new model active and serve ``ok`` requests on it."""
        for d in devices:
            self.activate(d)
            self.traffic(d, ok=ok)

    def updating(self, rid: str) -> list[str]:
        return [d for d, s in self.states(rid).items() if s == "updating"]

    def traffic(
        self, device: str, ok: int, errors: int = 0, model: str = "m:2", error: str = "engine_error"
    ) -> None:
        records = [
            TelemetryRecord(
                id=uuid.uuid4().hex,
                at=self.clock.now,
                model=model,
                served_by="local",
                prompt_tokens=3,
                completion_tokens=5,
                latency_ms=20.0,
                ok=i < ok,
                error=None if i < ok else error,
            )
            for i in range(ok + errors)
        ]
        self.fleet.record_telemetry(TENANT, TelemetryBatch(device_id=device, records=records))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.e2e)])
def fl(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Fleetlet]:
    """Each driver test on SQLite and on PostgreSQL (JSON columns and timestamps come back
    differently)."""
    url = (
        f"sqlite:///{tmp_path / 'cp.sqlite3'}"
        if request.param == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    f = Fleetlet(url)
    yield f
    f.engine.dispose()


def test_a_wave_starts_with_at_most_max_concurrent_devices(fl: Fleetlet) -> None:
    rid = fl.start(max_concurrent=1)
    published = fl.driver.tick()
    assert len(published) == 1 and published[0].model == NEW.model_dump(mode="json")
    assert sorted(fl.states(rid).values()) == ["pending", "pending", "pending", "updating"]


def test_a_device_reporting_the_target_is_active_then_healthy_after_its_window(fl: Fleetlet) -> None:
    rid = fl.start()
    fl.driver.tick()
    first = fl.updating(rid)
    assert len(first) == 2
    for d in first:
        fl.activate(d)
    fl.driver.tick()
    assert [fl.states(rid)[d] for d in first] == ["active", "active"]
    for d in first:
        fl.traffic(d, ok=10)
    fl.clock.advance(59)
    fl.driver.tick()
    assert [fl.states(rid)[d] for d in first] == ["active", "active"]  # the window is still open
    fl.clock.advance(2)
    fl.driver.tick()
    assert [fl.states(rid)[d] for d in first] == ["healthy", "healthy"]
    fl.driver.tick()  # the next wave starts
    assert sorted(fl.states(rid).values()) == ["healthy", "healthy", "updating", "updating"]


def test_the_whole_rollout_completes_wave_by_wave(fl: Fleetlet) -> None:
    rid = fl.start()
    for _ in range(2):
        fl.driver.tick()
        fl.serving(fl.updating(rid))
        fl.driver.tick()
        fl.clock.advance(61)
        fl.driver.tick()
    fl.driver.tick()
    assert fl.rollout_state(rid) == "completed"
    assert set(fl.states(rid).values()) == {"healthy"}
    # Without the device list, the waves' counts are the same (counted in the database).
    full, lean = fl.rollouts.show(TENANT, rid), fl.rollouts.show(TENANT, rid, devices=False)
    assert lean["devices"] == [] and lean["waves"] == full["waves"]
    assert [w["states"] for w in lean["waves"]] == [{"healthy": 2}, {"healthy": 2}]


def test_a_failing_wave_halts_and_sends_its_devices_back_as_a_rollback(fl: Fleetlet) -> None:
    rid = fl.start()
    fl.driver.tick()
    first = fl.updating(rid)
    for d in first:
        fl.activate(d)
        fl.traffic(d, ok=5, errors=5)  # 50 % errors: over max_error_rate (5 %) and over before
    fl.driver.tick()
    fl.clock.advance(61)
    back = fl.driver.tick()  # both fail their health gate, and the wave's verdict follows at once
    assert fl.rollout_state(rid) == "halted"
    assert "2 of 2 device(s) failed" in fl.rollouts.show(TENANT, rid)["message"]
    assert {r.device_id for r in back} == set(first)
    assert [(r.model, r.allow_downgrade) for r in back] == [(OLD.model_dump(mode="json"), True)] * 2
    assert [fl.states(rid)[d] for d in first] == ["rolled_back", "rolled_back"]
    assert [s for d, s in fl.states(rid).items() if d not in first] == ["pending", "pending"]


def test_too_few_requests_to_judge_holds_the_wave_until_its_timeout(fl: Fleetlet) -> None:
    rid = fl.start(min_samples=20, wave_timeout_s=300.0)
    fl.driver.tick()
    first = fl.updating(rid)
    for d in first:
        fl.activate(d)
        fl.traffic(d, ok=3)
    fl.driver.tick()
    fl.clock.advance(120)
    fl.driver.tick()
    assert [fl.states(rid)[d] for d in first] == ["active", "active"]  # unknown, not healthy
    fl.clock.advance(200)
    fl.driver.tick()
    assert [fl.states(rid)[d] for d in first] == ["timed_out", "timed_out"]


def test_a_silent_device_times_out_without_blocking_the_wave(fl: Fleetlet) -> None:
    rid = fl.start(wave_timeout_s=120.0)
    fl.driver.tick()
    first = sorted(fl.updating(rid))
    fl.activate(first[0])
    fl.traffic(first[0], ok=5)
    fl.driver.tick()
    fl.clock.advance(121)
    fl.driver.tick()
    assert fl.states(rid)[first[0]] == "healthy" and fl.states(rid)[first[1]] == "timed_out"
    fl.driver.tick()
    assert sorted(fl.states(rid).values()).count("updating") == 2  # the next wave went ahead


def test_client_side_errors_do_not_fail_a_device(fl: Fleetlet) -> None:
    rid = fl.start()
    fl.driver.tick()
    first = fl.updating(rid)
    for d in first:
        fl.activate(d)
        fl.traffic(d, ok=0, errors=5, error="queue_full")
        fl.traffic(d, ok=0, errors=5, error="client_disconnected")
        fl.traffic(d, ok=5)
    fl.driver.tick()
    fl.clock.advance(61)
    fl.driver.tick()
    assert [fl.states(rid)[d] for d in first] == ["healthy", "healthy"]


def test_the_transition_table_is_what_the_driver_may_do() -> None:
    assert set(TOUCHED_DEVICE_STATES) == {
        DeviceState.UPDATING,
        DeviceState.ACTIVE,
        DeviceState.HEALTHY,
        DeviceState.FAILED,
    }
    assert set(DEVICE_TRANSITIONS) == set(DeviceState)
    assert not DEVICE_TRANSITIONS[DeviceState.ROLLED_BACK] and not DEVICE_TRANSITIONS[DeviceState.TIMED_OUT]


def test_an_edge_the_table_lacks_is_refused(fl: Fleetlet) -> None:
    rid = fl.start()
    d = DeviceRow(fl.devices[0], 0, DeviceState.PENDING, None, 0, None, None, "")
    with fl.engine.begin() as conn, pytest.raises(IllegalTransition, match="pending → healthy"):
        fl.driver._update_device(conn, rid, d, state=DeviceState.HEALTHY)


def test_a_tick_reads_the_whole_waves_health_in_one_query(
    fl: Fleetlet, monkeypatch: pytest.MonkeyPatch
) -> None:
    rid = fl.start(waves=(100.0,))
    fl.driver.tick()
    fl.serving(fl.devices)
    fl.driver.tick()
    calls: list[int] = []
    real = fl.fleet.health_many

    def counted(tenant: str, asks: list[tuple[str, str, datetime]]) -> list[tuple[int, int, float | None]]:
        calls.append(len(asks))
        return real(tenant, asks)

    monkeypatch.setattr(fl.fleet, "health_many", counted)
    fl.clock.advance(61)
    fl.driver.tick()
    assert calls == [8]  # four devices, each on the target and on its previous model
    assert set(fl.states(rid).values()) == {"healthy"}


def test_a_paused_rollout_does_not_move_until_resumed(fl: Fleetlet) -> None:
    rid = fl.start()
    fl.rollouts.pause(TENANT, rid)
    assert fl.driver.tick() == [] and set(fl.states(rid).values()) == {"pending"}
    fl.rollouts.resume(TENANT, rid)
    assert len(fl.driver.tick()) == 2


def test_an_aborted_rollout_sends_nothing_more(fl: Fleetlet) -> None:
    rid = fl.start()
    fl.driver.tick()
    fl.rollouts.abort(TENANT, rid)
    fl.clock.advance(3600)
    assert fl.driver.tick() == []
    assert sorted(fl.states(rid).values()) == ["pending", "pending", "updating", "updating"]


def test_a_second_rollout_of_devices_still_in_one_is_refused(fl: Fleetlet) -> None:
    """Two unfinished rollouts over the same devices would each judge the other's model (one
    "completed" with every device timed out) and a rollback of one would undo the other."""
    first = fl.start()
    fl.driver.tick()
    with pytest.raises(Conflict, match=first):
        fl.rollouts.create(TENANT, RolloutSpec(model=ref("3"), waves=(100.0,)))
    fl.rollouts.pause(TENANT, first)
    with pytest.raises(Conflict):
        fl.rollouts.create(TENANT, RolloutSpec(model=ref("3"), waves=(100.0,)))
    fl.rollouts.abort(TENANT, first)
    second = fl.rollouts.create(TENANT, RolloutSpec(model=ref("3"), waves=(100.0,)))
    assert second["state"] == "running" and len(second["devices"]) == len(fl.devices)


def test_of_two_actions_at_once_one_wins_and_the_other_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An abort commits between a rollback's read of the state and its write (SQLite takes no
    row lock for the read; PostgreSQL's FOR UPDATE serializes them): the rollback is refused
    with a 409, not acknowledged and then lost under the abort."""
    fl = Fleetlet(f"sqlite:///{tmp_path / 'cp.sqlite3'}")
    rid = fl.start()
    fl.driver.tick()
    read = Rollouts._row

    def abort_meanwhile(self: Rollouts, conn: Any, tenant: str, r: str, lock: bool = False) -> Any:
        found = read(self, conn, tenant, r, lock)
        if lock:
            monkeypatch.setattr(Rollouts, "_row", read)
            fl.rollouts.abort(TENANT, rid)  # its own connection, committed now
        return found

    monkeypatch.setattr(Rollouts, "_row", abort_meanwhile)
    with pytest.raises(Conflict, match="changed to aborted"):
        fl.rollouts.rollback(TENANT, rid)
    assert fl.rollout_state(rid) == "aborted"
    assert fl.driver.tick() == []


def test_an_operator_action_during_a_tick_rolls_the_tick_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pause committed while the driver's tick runs: the tick's device rows and desired
    states are rolled back (nothing is published for a paused rollout), and the pause stays."""
    fl = Fleetlet(f"sqlite:///{tmp_path / 'cp.sqlite3'}")
    rid = fl.start()
    decide = fl.fleet.next_desired_many

    def paused_meanwhile(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(fl.fleet, "next_desired_many", decide)
        fl.rollouts.pause(TENANT, rid)  # its own connection, committed now
        return decide(*args, **kwargs)

    monkeypatch.setattr(fl.fleet, "next_desired_many", paused_meanwhile)
    assert fl.driver.tick() == []
    assert fl.rollout_state(rid) == "paused" and set(fl.states(rid).values()) == {"pending"}
    assert all(fl.fleet.current_desired(TENANT, d) is None for d in fl.devices)
    fl.rollouts.resume(TENANT, rid)
    assert len(fl.driver.tick()) == 2


def test_an_operator_rollback_sends_every_touched_device_back(fl: Fleetlet) -> None:
    rid = fl.start()
    fl.driver.tick()
    first = fl.updating(rid)
    fl.activate(first[0])
    fl.driver.tick()
    fl.rollouts.rollback(TENANT, rid)
    back = fl.driver.tick()
    assert sorted(r.device_id for r in back) == sorted(first)
    assert all(r.model == OLD.model_dump(mode="json") and r.allow_downgrade for r in back)
    assert fl.rollout_state(rid) == "rolled_back"
    assert [s for d, s in fl.states(rid).items() if d not in first] == ["pending", "pending"]


def test_a_rollback_to_a_model_deleted_from_the_registry_is_refused(fl: Fleetlet) -> None:
    """Devices sent back to a version deleted since would fetch a package that is gone, and
    fail: the rollback is refused with a 409 naming it, and the rollout keeps its state."""
    from cloud.plane.rollouts.actions import Rollouts

    rid = fl.start()
    fl.driver.tick()
    fl.activate(fl.updating(rid)[0])
    fl.driver.tick()
    deleted = {("t", "m", "1")}
    fl.rollouts = Rollouts(fl.engine, fl.fleet, lambda t, n, v: (t, n, v) not in deleted)
    with pytest.raises(Conflict, match="m:1, no longer in the registry"):
        fl.rollouts.rollback(TENANT, rid)
    assert fl.rollout_state(rid) == "running"
    deleted.clear()  # uploaded again
    assert fl.rollouts.rollback(TENANT, rid)["state"] == "rolling_back"


def _evaluation(agreement: float, model: str = "m:2") -> EvalReport:
    return EvalReport(model=model, reference="m:1", cases=24, tokens=900, agreement=agreement, expected=0.96)


def test_a_device_whose_evaluation_falls_below_the_packagers_fails_the_quality_gate(fl: Fleetlet) -> None:
    """Fast but wrong: the devices of wave 1 serve without a single error, but their answers
    agree with the package's evaluation set far less than the packager measured."""
    rid = fl.start()
    fl.driver.tick()
    first = fl.updating(rid)
    for d in first:
        fl.activate(d, _evaluation(0.41))
    back = fl.driver.tick()
    assert fl.rollout_state(rid) == "halted"
    devices = {d["device_id"]: d for d in fl.rollouts.show(TENANT, rid)["devices"]}
    assert all("quality gate: 41.0%" in devices[d]["detail"] for d in first), devices
    assert {r.device_id for r in back} == set(first)
    assert [fl.states(rid)[d] for d in first] == ["rolled_back", "rolled_back"]


def test_a_device_that_failed_under_the_threshold_is_sent_back_while_the_rollout_goes_on(
    fl: Fleetlet,
) -> None:
    """One device of two fails the quality gate, the threshold tolerates it: the wave passes, and
    that device does not stay on a model that answers wrongly."""
    rid = fl.start(failure_threshold=0.5)
    fl.driver.tick()
    good, bad = sorted(fl.updating(rid))
    fl.activate(good, _evaluation(0.95))
    fl.traffic(good, ok=5)
    fl.activate(bad, _evaluation(0.41))
    fl.driver.tick()
    assert fl.states(rid)[bad] == "failed"
    fl.clock.advance(61)
    back = fl.driver.tick()
    assert fl.rollout_state(rid) == "running"
    assert [(r.device_id, r.model, r.allow_downgrade) for r in back] == [
        (bad, OLD.model_dump(mode="json"), True)
    ]
    assert fl.states(rid)[good] == "healthy" and fl.states(rid)[bad] == "rolled_back"
    assert "1 failed (under the threshold) and sent back" in fl.rollouts.show(TENANT, rid)["message"]


def test_a_good_evaluation_or_none_passes_the_quality_gate(fl: Fleetlet) -> None:
    """Within max_eval_drop of the packager's figure, no evaluation set at all, or a report about
    another model (a stale one): the device goes on to its health window as before."""
    rid = fl.start(waves=(100.0,))
    fl.driver.tick()
    reports = [_evaluation(0.93), None, _evaluation(0.1, model="m:1"), _evaluation(0.955)]
    for d, evaluation in zip(fl.updating(rid), reports, strict=True):
        fl.activate(d, evaluation)
        fl.traffic(d, ok=5)
    fl.driver.tick()
    assert set(fl.states(rid).values()) == {"active"}
    fl.clock.advance(61)
    fl.driver.tick()
    assert fl.rollout_state(rid) == "completed"


def test_max_eval_drop_is_a_fraction(fl: Fleetlet) -> None:
    with pytest.raises(ContractError):
        fl.start(max_eval_drop=1.5)


def test_a_device_that_ran_no_model_is_sent_back_to_none(fl: Fleetlet) -> None:
    """A device that never had a model (none desired, none active) rolls back to none: its
    previous model is stored as JSON null and read back as none, on both databases."""
    fl.fleet.record_reported(TENANT, ReportedState(device_id="bare", revision=0, phase=Phase.IDLE))
    rid = fl.start(waves=(100.0,))
    started = {r.device_id for r in fl.driver.tick()}
    assert "bare" in started and "d0" in started
    fl.rollouts.rollback(TENANT, rid)
    back = {r.device_id: r for r in fl.driver.tick()}
    assert back["bare"].model is None
    assert back["d0"].model == OLD.model_dump(mode="json")
    assert fl.rollout_state(rid) == "rolled_back"


def _count_row_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The rollouts whose device rows a driver read from the database, in order."""
    from cloud.plane.rollouts import driver as driver_module

    reads: list[str] = []
    real = driver_module._device_rows

    def counted(conn: Any, rid: str) -> list[DeviceRow]:
        reads.append(rid)
        return real(conn, rid)

    monkeypatch.setattr(driver_module, "_device_rows", counted)
    return reads


def test_a_driver_reads_the_device_rows_again_only_after_another_replica_drove(
    fl: Fleetlet, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = _count_row_reads(monkeypatch)
    other = RolloutDriver(fl.engine, fl.fleet, owner="other", lease_s=30, clock=fl.clock)
    rid = fl.start()
    fl.driver.tick()
    first = fl.updating(rid)
    fl.serving(first)
    fl.driver.tick()
    assert reads == [rid]  # its own writes are what it holds
    fl.clock.advance(61)  # past this driver's lease: the other replica takes the rollout over
    other.tick()  # the first wave healthy
    started = other.tick()  # the second wave started by the other replica
    assert len(reads) == 2 and {r.device_id for r in started} == set(fl.devices) - set(first)
    fl.clock.advance(61)
    # Back to the first driver: its rows are stale (the second wave pending in them); it reads
    # them again instead of starting the wave a second time.
    assert fl.driver.tick() == []
    assert reads == [rid] * 3
    assert sorted(fl.states(rid).values()) == ["healthy", "healthy", "updating", "updating"]


def test_a_drive_that_failed_leaves_no_rows_behind_in_memory(
    fl: Fleetlet, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = _count_row_reads(monkeypatch)
    rid, first = fl.first_wave_active()
    real_flush = fl.driver._flush

    def failing(conn: Any) -> None:
        raise RuntimeError("the database went away mid-tick")

    monkeypatch.setattr(fl.driver, "_flush", failing)
    assert fl.driver.tick() == [] and fl.driver.failures == 1
    monkeypatch.setattr(fl.driver, "_flush", real_flush)
    # The failed tick had moved both devices to active in memory; rolled back, they are
    # updating, and the next tick reads them so and moves them again.
    fl.driver.tick()
    assert reads == [rid, rid]
    assert [fl.states(rid)[d] for d in first] == ["active", "active"]


def test_a_finished_rollout_leaves_the_drivers_memory(fl: Fleetlet) -> None:
    rid = fl.start()
    fl.driver.tick()
    assert rid in fl.driver._known
    fl.rollouts.abort(TENANT, rid)
    fl.driver.tick()
    assert fl.driver._known == {}


def test_a_rollback_sends_a_device_to_its_desired_model_on_record_else_to_the_one_it_reports(
    fl: Fleetlet,
) -> None:
    """The previous model: what the control plane last asked the device to run, or, for a device
    it never gave a model, the one it reports active."""
    pinned = ref("0")
    fl.fleet.next_desired(TENANT, fl.devices[0], model=pinned)
    rid = fl.start(waves=(100.0,))
    fl.driver.tick()
    fl.rollouts.rollback(TENANT, rid)
    back = {r.device_id: r.model for r in fl.driver.tick()}
    assert back[fl.devices[0]] == pinned.model_dump(mode="json")
    assert [back[d] for d in fl.devices[1:]] == [OLD.model_dump(mode="json")] * 3


def test_a_device_still_updating_gets_its_desired_state_again_every_30_seconds(fl: Fleetlet) -> None:
    """In case the replica that recorded a desired state died before publishing it; the same
    revision, and no more once the device's update ended."""
    rid = fl.start(wave_timeout_s=600.0)
    first = {r.device_id: r.revision for r in fl.driver.tick()}
    assert fl.driver.tick() == []
    fl.clock.advance(31)
    again = fl.driver.tick()
    assert {r.device_id: r.revision for r in again} == first
    fl.clock.advance(10)
    assert fl.driver.tick() == []
    done, waiting = sorted(first)
    fl.activate(done)
    fl.clock.advance(25)
    assert [r.device_id for r in fl.driver.tick()] == [waiting]
    assert fl.states(rid)[done] == "active"
    assert (TENANT, done) not in fl.driver.last_publish


def test_a_drive_that_another_replica_overlapped_rolls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLite: the driver's reads see no stable snapshot, so another replica's drive can commit
    between them and this drive's writes (PostgreSQL's row lock on the rollout rules it out).
    The version it read no longer matches: its changes roll back, and the next tick reads the
    rows again."""
    fl = Fleetlet(f"sqlite:///{tmp_path / 'cp.sqlite3'}")
    rid, first = fl.first_wave_active()
    real = fl.fleet.progress

    def overlapped(*args: Any, **kwargs: Any) -> Any:
        with fl.engine.begin() as conn:  # another replica commits its drive now
            conn.execute(update(rollouts).values(devices_version=rollouts.c.devices_version + 1))
        return real(*args, **kwargs)

    monkeypatch.setattr(fl.fleet, "progress", overlapped)
    with caplog.at_level(logging.WARNING):
        assert fl.driver.tick() == []
    assert "driven by another replica" in caplog.text and fl.driver.failures == 0
    assert [fl.states(rid)[d] for d in first] == ["updating", "updating"]
    monkeypatch.setattr(fl.fleet, "progress", real)
    fl.driver.tick()
    assert [fl.states(rid)[d] for d in first] == ["active", "active"]
    fl.engine.dispose()


def test_a_lease_taken_rather_than_renewed_reads_the_rows_again(
    fl: Fleetlet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whoever held the rollout meanwhile may be a replica of a release that does not count
    its writes."""
    reads = _count_row_reads(monkeypatch)
    rid = fl.start()
    fl.driver.tick()
    fl.driver.tick()
    assert reads == [rid]
    fl.clock.advance(31)  # the lease (30 s) lapsed: taken again, not renewed
    fl.driver.tick()
    assert reads == [rid, rid]


def test_an_overdue_device_that_reported_the_target_in_time_for_the_tick_is_active(fl: Fleetlet) -> None:
    rid = fl.start(wave_timeout_s=120.0)
    fl.driver.tick()
    first = sorted(fl.updating(rid))
    fl.clock.advance(121)
    fl.activate(first[0])
    fl.driver.tick()
    assert fl.states(rid)[first[0]] == "active" and fl.states(rid)[first[1]] == "timed_out"


def test_a_device_gone_from_the_fleet_times_out_instead_of_holding_its_wave(fl: Fleetlet) -> None:
    rid = fl.start(wave_timeout_s=120.0)
    fl.driver.tick()
    gone = sorted(fl.updating(rid))[0]
    with fl.engine.begin() as conn:  # by hand: the control plane never deletes a device
        conn.execute(delete(devices).where(devices.c.device_id == gone))
    fl.driver.tick()
    assert fl.states(rid)[gone] == "updating"
    fl.clock.advance(121)
    fl.driver.tick()
    detail = {d["device_id"]: d["detail"] for d in fl.rollouts.show(TENANT, rid)["devices"]}
    assert fl.states(rid)[gone] == "timed_out" and "no longer in the fleet" in detail[gone]


def test_the_driver_forgets_re_publish_times_of_devices_it_no_longer_drives(fl: Fleetlet) -> None:
    rid = fl.start()
    fl.driver.tick()
    fl.driver.tick()
    assert len(fl.driver.last_publish) == 2
    fl.rollouts.abort(TENANT, rid)
    fl.clock.advance(301)
    fl.driver.tick()
    assert fl.driver.last_publish == {}
