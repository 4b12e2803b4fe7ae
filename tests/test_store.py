"""The control plane's schema (cloud/plane/store.py): the migrations, applied to an empty
database, build exactly the tables the code declares, on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Connection, inspect, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from cloud.plane.store import MIGRATIONS, in_transaction, make_engine, metadata, migrate


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.e2e)])
def empty(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    url = (
        f"sqlite:///{tmp_path / 'cp.sqlite3'}"
        if request.param == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    engine = make_engine(url)
    yield engine
    engine.dispose()


def _schema(engine: Engine) -> dict[str, dict[str, tuple[bool, bool]]]:
    """table → column → (nullable, part of the primary key), as the database has it."""
    found = inspect(engine)
    out = {}
    for table in found.get_table_names():
        pk = set(found.get_pk_constraint(table)["constrained_columns"])
        out[table] = {c["name"]: (bool(c["nullable"]), c["name"] in pk) for c in found.get_columns(table)}
    return out


def test_migrations_build_the_declared_schema(empty: Engine) -> None:
    assert migrate(empty) == [v for v, _, _ in MIGRATIONS]
    assert migrate(empty) == []  # idempotent
    declared = {
        t.name: {c.name: (bool(c.nullable) and not c.primary_key, c.primary_key) for c in t.columns}
        for t in metadata.sorted_tables
    }
    assert _schema(empty) == declared
    indexes = {i["name"] for t in declared for i in inspect(empty).get_indexes(t)}
    assert {"ix_telemetry_device_id", "ix_telemetry_at", "ix_telemetry_received_at"} <= indexes


class _Aborted(Exception):
    def __init__(self, sqlstate: str) -> None:
        super().__init__(f"aborted ({sqlstate})")
        self.sqlstate = sqlstate


def test_a_transaction_the_database_aborted_to_break_a_deadlock_runs_again(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'cp.sqlite3'}")
    tries: list[int] = []

    def work(conn: Connection) -> int:
        tries.append(1)
        if len(tries) < 3:
            raise DBAPIError("UPDATE devices …", None, _Aborted("40P01"))
        return int(conn.execute(text("SELECT 7")).scalar_one())

    assert in_transaction(engine, work) == 7 and len(tries) == 3

    def aborted(sqlstate: str) -> Callable[[Connection], int]:
        def work(conn: Connection) -> int:
            tries.append(1)
            raise DBAPIError("UPDATE devices …", None, _Aborted(sqlstate))

        return work

    for sqlstate, attempts in (("40P01", 3), ("23505", 1)):  # a unique violation is not retried
        tries.clear()
        with pytest.raises(DBAPIError):
            in_transaction(engine, aborted(sqlstate))
        assert len(tries) == attempts
    engine.dispose()
