"""The fleet table (cloud/plane/fleet.py) on SQLite and PostgreSQL, in process."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy.engine import Engine

from cloud.plane.fleet import Fleet
from shared.errors import NotFound
from shared.messages import DeviceStatus


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
