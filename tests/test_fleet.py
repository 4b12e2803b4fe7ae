"""The fleet table (cloud/plane/fleet.py) on SQLite and PostgreSQL, in process."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy.engine import Engine

from cloud.plane.fleet import Fleet, Selector
from shared.errors import NotFound
from shared.messages import DeviceStatus, ErrorInfo, EvalReport, ModelRef, Phase, ReportedState


def test_concurrent_label_merges_lose_none(plane_db: Engine) -> None:
    fleet = Fleet(plane_db)
    fleet.record_status("t", DeviceStatus(device_id="dev-1", state="online"))
    start = threading.Barrier(8)
    errors: list[BaseException] = []

    def label(i: int) -> None:
        try:
            start.wait()
            for round_ in range(5):
                fleet.set_labels("t", "dev-1", {f"k{i}": f"v{round_}"})
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=label, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert fleet.get("t", "dev-1").labels == {f"k{i}": "v4" for i in range(8)}


def test_labels_merge_replace_and_remove(plane_db: Engine) -> None:
    fleet = Fleet(plane_db)
    fleet.record_status("t", DeviceStatus(device_id="dev-1", state="online"))
    assert fleet.set_labels("t", "dev-1", {"site": "a", "tier": "x"}).labels == {"site": "a", "tier": "x"}
    assert fleet.set_labels("t", "dev-1", {"tier": ""}).labels == {"site": "a"}
    assert fleet.set_labels("t", "dev-1", {"zone": "b"}, replace=True).labels == {"zone": "b"}
    with pytest.raises(NotFound):
        fleet.set_labels("t", "nobody", {"a": "b"})


def test_status_counts_come_from_the_database_per_tenant(plane_db: Engine) -> None:
    fleet = Fleet(plane_db)
    for i, state in enumerate(["online", "online", "offline"]):
        fleet.record_status("t", DeviceStatus(device_id=f"d{i}", state=state))  # type: ignore[arg-type]
    fleet.record_status("other", DeviceStatus(device_id="d9", state="online"))
    assert fleet.status_counts("t") == {"online": 2, "offline": 1}
    assert fleet.status_counts("nobody") == {}


def _ref(version: str) -> ModelRef:
    return ModelRef(name="m", version=version, manifest_digest="sha256:" + "a" * 64, manifest_size=100)


def test_a_batch_of_messages_is_stored_in_arrival_order(plane_db: Engine) -> None:
    """Several messages of one device in one transaction (the ingest thread's batch): the row
    ends as the last said, and the history holds every change in order."""
    fleet = Fleet(plane_db)
    fleet.record(
        [
            ("t", DeviceStatus(device_id="new-1", state="online")),
            ("t", ReportedState(device_id="new-1", revision=-1, phase=Phase.IDLE)),
            ("other", DeviceStatus(device_id="new-1", state="online")),
            (
                "t",
                ReportedState(
                    device_id="new-1", revision=1, phase=Phase.ACTIVE, active_slot="a", slots={"a": _ref("1")}
                ),
            ),
            ("t", DeviceStatus(device_id="new-1", state="offline")),
        ]
    )
    dev = fleet.get("t", "new-1")
    assert (dev.status, dev.phase, dev.active_model, dev.reported_revision) == ("offline", "active", "m:1", 1)
    events = [(e["kind"], e["old"], e["new"]) for e in reversed(fleet.events("t", "new-1"))]
    assert events == [
        ("status", "unknown", "online"),
        ("phase", None, "idle"),
        ("phase", "idle", "active"),
        ("model", None, "m:1"),
        ("status", "online", "offline"),
    ]
    assert fleet.get("other", "new-1").status == "online"


def test_desired_states_for_many_devices_count_each_revision_up(plane_db: Engine) -> None:
    fleet = Fleet(plane_db)
    for i in range(3):
        fleet.record_status("t", DeviceStatus(device_id=f"d{i}", state="online"))
    first = fleet.next_desired("t", "d0", config={"runtime": {"threads": 2}})
    with plane_db.begin() as conn:
        records = fleet.next_desired_many(
            "t", ["d0", "d1", "d2", "unknown-3"], model=_ref("2"), allow_downgrade=True, conn=conn
        )
    assert [(r.device_id, r.revision) for r in records] == [("d0", 2), ("d1", 1), ("d2", 1), ("unknown-3", 1)]
    assert records[0].config == first.config  # each keeps its config
    assert all(r.model == _ref("2").model_dump(mode="json") and r.allow_downgrade for r in records)
    assert fleet.current_desired("t", "d1") == records[1]
    overdue = fleet.progress(
        "t", ["d0", "d1", "d2", "unknown-3"], "m:2", overdue=["d0", "d1", "d2", "unknown-3"]
    )
    assert set(overdue) == {"d0", "d1", "d2", "unknown-3"} and overdue["d0"].status == "online"


def test_a_config_for_many_devices_keeps_each_ones_model_and_counts_its_revision_up(plane_db: Engine) -> None:
    fleet = Fleet(plane_db)
    for i in range(3):
        fleet.record_status("t", DeviceStatus(device_id=f"d{i}", state="online"))
    fleet.set_labels("t", "d1", {"zone": "eu"})
    fleet.set_labels("t", "d2", {"zone": "eu"})
    fleet.next_desired("t", "d1", model=_ref("2"), allow_downgrade=True)
    assert fleet.matching("t", Selector.parse("zone=eu")) == ["d1", "d2"]
    config = {"runtime": {"threads": 1}}
    records = fleet.next_config_many("t", ["d1", "d2"], config)
    assert [(r.device_id, r.revision, r.config) for r in records] == [("d1", 2, config), ("d2", 1, config)]
    assert (records[0].model, records[0].allow_downgrade) == (_ref("2").model_dump(mode="json"), True)
    assert (records[1].model, records[1].allow_downgrade) == (None, False)
    assert [fleet.current_desired("t", d) for d in ("d1", "d2")] == records
    assert fleet.current_desired("t", "d0") is None  # not matched, untouched


def test_progress_reads_the_ended_updates_of_the_devices_asked_for_however_many(plane_db: Engine) -> None:
    """The rollout driver's view: of the devices asked (a few by IN list, most of a large wave in
    one pass), those whose update ended — failed, or active on the target, with the parts of
    their reports that say how (evaluation, target revision, error) — and those overdue whatever
    their state; devices still on their way, and unknown ids, are left out."""
    fleet = Fleet(plane_db)
    target = _ref("2")
    evaluation = EvalReport(model="m:2", reference="ref", cases=3, tokens=40, agreement=0.9, expected=0.95)
    messages: list[tuple[str, DeviceStatus | ReportedState]] = []
    for i in range(600):
        failed = i % 100 == 7
        slots = {"a": target} if i % 2 else {"a": _ref("1")}
        report = ReportedState(
            device_id=f"d{i:03d}",
            revision=1,
            phase=Phase.FAILED if failed else Phase.ACTIVE,
            active_slot="a",
            slots=slots,
            target_revision=1 if failed else -1,
            last_error=ErrorInfo(code="fetch_failed", message=f"chunk {i} ✗") if failed else None,
            evaluation=evaluation if i % 3 == 0 else None,
        )
        messages.append(("t", report))
    fleet.record(messages)
    for asked in ([f"d{i:03d}" for i in range(10)], [f"d{i:03d}" for i in range(550)] + ["nobody"]):
        overdue = [asked[0], asked[2], "nobody"]  # d000 and d002 run the previous model
        progress = fleet.progress("t", asked, "m:2", overdue=overdue)
        ended = [d for d in asked if d != "nobody" and (int(d[1:]) % 2 == 1 or int(d[1:]) % 100 == 7)]
        assert sorted(progress) == sorted(ended + overdue[:2])
        for d in ended:
            p, i = progress[d], int(d[1:])
            assert p.outcome is not None
            assert p.phase == "failed" or p.active_model == "m:2"
            assert p.outcome.get("evaluation") == (evaluation.model_dump(mode="json") if i % 3 == 0 else None)
            if i % 100 == 7:
                assert p.outcome["target_revision"] == 1
                assert p.outcome["last_error"]["code"] == "fetch_failed"
                assert p.outcome["last_error"]["message"] == f"chunk {i} ✗"
            else:
                assert p.outcome.get("target_revision", -1) == -1 and "last_error" not in p.outcome
        for d in overdue[:2]:
            p = progress[d]
            assert p.outcome is None and p.phase == "active" and p.active_model == "m:1"


def test_history_older_than_the_retention_is_pruned(plane_db: Engine) -> None:
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import func, select

    from cloud.plane.store import telemetry
    from shared.messages import TelemetryBatch
    from tests.factories import make_telemetry_record

    now = [datetime(2026, 10, 1, tzinfo=UTC)]
    fleet = Fleet(plane_db, clock=lambda: now[0])

    def day(n: int) -> None:
        now[0] = datetime(2026, 10, 1, tzinfo=UTC) + timedelta(days=n)
        state = "online" if n % 2 == 0 else "offline"
        fleet.record([("t", DeviceStatus(device_id="d", state=state, at=now[0]))])
        record = make_telemetry_record(id=f"record-{n:04d}", at=now[0])
        fleet.record_telemetry("t", TelemetryBatch(device_id="d", records=[record]))

    for n in (0, 1, 40):
        day(n)
    assert fleet.prune(datetime(2026, 10, 1, tzinfo=UTC) + timedelta(days=30)) == (2, 2)
    assert [e["new"] for e in fleet.events("t", "d")] == ["online"]  # day 40's change is kept
    with plane_db.connect() as conn:
        assert conn.execute(select(func.count()).select_from(telemetry)).scalar() == 1
    assert fleet.prune(datetime(2026, 10, 1, tzinfo=UTC) + timedelta(days=30)) == (0, 0)
