"""The ingest thread (cloud/plane/ingest.py): messages stored many per transaction, in arrival
order, acknowledged only once stored; a batch the database refuses is retried one by one so
that a single bad message holds back nothing else."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from cloud.plane.fleet import DeviceMessage, Fleet
from cloud.plane.ingest import Ingest
from cloud.plane.store import make_engine, migrate
from shared.messages import DeviceStatus, Phase, ReportedState


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
