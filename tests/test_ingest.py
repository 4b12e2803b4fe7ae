"""The ingest thread (cloud/plane/ingest.py): messages stored many per transaction, in arrival
order, acknowledged only once stored; a batch the database refuses is retried one by one so
that a single bad message holds back nothing else."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import func, select

from cloud.plane.fleet import DeviceMessage, Fleet
from cloud.plane.ingest import Ingest
from cloud.plane.store import make_engine, migrate, telemetry
from shared.messages import DeviceStatus, Phase, ReportedState, TelemetryBatch
from tests.factories import make_telemetry_record


class CountingFleet(Fleet):
    """The real fleet on SQLite, counting transactions; refuses any batch naming ``poison``."""

    def __init__(self, path: Path) -> None:
        engine = make_engine(f"sqlite:///{path}")
        migrate(engine)
        super().__init__(engine)
        self.transactions: list[int] = []

    def record(self, items: Sequence[tuple[str, DeviceMessage]]) -> None:
        if any(m.device_id == "poison" for _, m in items):
            raise RuntimeError("the database refused it")
        self.transactions.append(len(items))
        super().record(items)


def test_a_burst_is_stored_in_few_transactions_and_acknowledged_in_order(tmp_path: Path) -> None:
    fleet = CountingFleet(tmp_path / "cp.sqlite3")
    ingest = Ingest(fleet, max_batch=100)
    acked: list[str] = []

    async def burst() -> None:
        for i in range(300):
            ingest.put(
                "t",
                DeviceStatus(device_id=f"d{i:03d}", state="online"),
                lambda i=i: acked.append(f"d{i:03d}"),
            )
        ingest.put(
            "t",
            ReportedState(device_id="poison", revision=1, phase=Phase.IDLE),
            lambda: acked.append("poison"),
        )
        ingest.put(
            "t", ReportedState(device_id="d000", revision=1, phase=Phase.IDLE), lambda: acked.append("last")
        )
        for _ in range(500):
            if len(acked) == 301:
                return
            await asyncio.sleep(0.01)

    asyncio.run(burst())
    ingest.close()
    assert acked == [f"d{i:03d}" for i in range(300)] + ["last"]  # never the refused one
    assert sum(fleet.transactions) == 301 and max(fleet.transactions) <= 100
    assert len(fleet.transactions) < 301  # batched, not one transaction per message
    assert ingest.failed == 1
    assert fleet.get("t", "d000").phase == "idle" and fleet.status_counts("t") == {"online": 300}


class SlowFleet(CountingFleet):
    """Each transaction waits for ``gate``: what a busy database looks like to the ingest thread."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gate = threading.Event()

    def record(self, items: Sequence[tuple[str, DeviceMessage]]) -> None:
        self.gate.wait(10)
        super().record(items)


def test_a_flooding_device_fills_its_own_backlog_not_the_others(tmp_path: Path) -> None:
    """Beyond ``per_device`` messages waiting, a device's messages are dropped unacknowledged
    (it sends them again); the other devices' messages still go in and are acknowledged."""
    fleet = SlowFleet(tmp_path / "cp.sqlite3")
    ingest = Ingest(fleet, max_batch=1000, per_device=8)
    acked: list[str] = []

    async def flood() -> None:
        for i in range(500):
            ingest.put(
                "t", DeviceStatus(device_id="noisy", state="online"), lambda i=i: acked.append(f"n{i}")
            )
        assert ingest.backlog <= 8 + 1  # one may already be in the thread's hands
        ingest.put("t", DeviceStatus(device_id="quiet", state="online"), lambda: acked.append("quiet"))
        fleet.gate.set()
        for _ in range(500):
            if "quiet" in acked:
                return
            await asyncio.sleep(0.01)

    asyncio.run(flood())
    ingest.close()
    assert "quiet" in acked and ingest.backlog == 0
    assert 8 <= len(acked) - 1 <= 9 and ingest.refused == 500 - len(acked) + 1
    assert fleet.status_counts("t") == {"online": 2}


def test_a_telemetry_batch_sent_again_stores_each_record_once(tmp_path: Path) -> None:
    fleet = CountingFleet(tmp_path / "cp.sqlite3")
    records = [make_telemetry_record(id=f"record-{i:04d}") for i in range(300)]
    assert fleet.record_telemetry("t", TelemetryBatch(device_id="d", records=records[:200])) == 200
    assert fleet.record_telemetry("t", TelemetryBatch(device_id="d", records=records)) == 100
    assert fleet.record_telemetry("t", TelemetryBatch(device_id="d", records=records)) == 0
    with fleet.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(telemetry)).scalar() == 300


def test_the_fleets_traffic_is_counted_as_its_telemetry_is_stored(tmp_path: Path) -> None:
    """Agents' own /metrics are on their nodes' 127.0.0.1: the cloud's dashboard reads what
    they report instead (cloud/plane/traffic.py)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.registry import Collector

    from cloud.plane.traffic import FleetTraffic

    traffic = FleetTraffic()
    ingest = Ingest(CountingFleet(tmp_path / "cp.sqlite3"), traffic=traffic)
    records = [
        make_telemetry_record(id="record-0001", served_by="local", completion_tokens=5, latency_ms=80.0),
        make_telemetry_record(id="record-0002", served_by="local", completion_tokens=7, latency_ms=3000.0),
        make_telemetry_record(
            id="record-0003", served_by="cloud", completion_tokens=2, latency_ms=400.0, ok=False
        ),
    ]

    async def put() -> None:
        stored = asyncio.Event()
        ingest.put("t", TelemetryBatch(device_id="d", records=records), stored.set)
        await asyncio.wait_for(stored.wait(), 10)

    asyncio.run(put())
    ingest.close()

    class Families(Collector):
        def collect(self):  # type: ignore[no-untyped-def]
            return traffic.families("autoglm_cloud", ["t", "quiet"])

    registry = CollectorRegistry()
    registry.register(Families())
    text = generate_latest(registry).decode()
    for line in (
        'autoglm_cloud_fleet_requests_total{served_by="local",tenant="t"} 2.0',
        'autoglm_cloud_fleet_requests_total{served_by="cloud",tenant="t"} 1.0',
        'autoglm_cloud_fleet_request_errors_total{served_by="cloud",tenant="t"} 1.0',
        'autoglm_cloud_fleet_completion_tokens_total{served_by="local",tenant="t"} 12.0',
        'autoglm_cloud_fleet_request_seconds_bucket{le="0.1",served_by="local",tenant="t"} 1.0',
        'autoglm_cloud_fleet_request_seconds_bucket{le="2.5",served_by="local",tenant="t"} 1.0',
        'autoglm_cloud_fleet_request_seconds_bucket{le="5.0",served_by="local",tenant="t"} 2.0',
        'autoglm_cloud_fleet_request_seconds_sum{served_by="local",tenant="t"} 3.08',
        # A tenant that reported nothing yet has its series, at 0.
        'autoglm_cloud_fleet_requests_total{served_by="local",tenant="quiet"} 0.0',
    ):
        assert line in text, (line, text)
