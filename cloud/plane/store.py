"""The control plane's database: SQLAlchemy Core tables, SQLite embedded or PostgreSQL.

Schema changes are migrations in ``MIGRATIONS`` (append only); :func:`migrate` applies the
missing ones at start-up, inside one transaction guarded by a lock (a PostgreSQL advisory lock,
SQLite's write lock), and records each in ``schema_migrations``. Nobody runs DDL by hand.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Connection,
    DateTime,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    event,
    insert,
    select,
    text,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.types import TypeDecorator

from shared.errors import ConfigError

log = logging.getLogger(__name__)


class SerializedJSON(TypeDecorator[str]):
    """A value for a JSON column that is already JSON text (pydantic's ``model_dump_json``),
    bound as it is: the JSON type takes a dict and serializes it itself. A report stored this way
    costs no ``model_dump`` and ``json.dumps`` (9.8 -> 3.3 us). PostgreSQL still casts the
    parameter to JSON, which checks it."""

    impl = JSON
    cache_ok = True

    def bind_processor(self, dialect: Any) -> None:
        return None


metadata = MetaData()


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands timestamps back without their zone; they were written as UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


schema_migrations = Table(
    "schema_migrations",
    metadata,
    Column("version", Integer, primary_key=True),
    Column("name", String(200), nullable=False),
    Column("applied_at", DateTime(timezone=True), nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("key_id", String(32), primary_key=True),
    Column("tenant", String(64), nullable=False, index=True),
    Column("name", String(200), nullable=False),
    Column("scope", String(16), nullable=False),
    Column("secret_sha256", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("revoked", Boolean, nullable=False, default=False),
    # v2: None never expires.
    Column("expires_at", DateTime(timezone=True)),
)

devices = Table(
    "devices",
    metadata,
    Column("tenant", String(64), primary_key=True),
    Column("device_id", String(64), primary_key=True),
    Column("labels", JSON, nullable=False, default=dict),
    Column("status", String(16), nullable=False, default="unknown"),
    Column("last_seen", DateTime(timezone=True)),
    Column("phase", String(32)),
    Column("active_model", String(200)),
    # v7: BIGINT on PostgreSQL (revisions are int64 on the wire; INTEGER refused a device's
    # report past 2**31 and failed its ingest batch).
    Column("reported_revision", BigInteger, nullable=False, default=-1),
    Column("reported", JSON),
    # What we asked for: the last desired state published to the device.
    Column("desired_revision", BigInteger, nullable=False, default=0),
    Column("desired_model", JSON),
    Column("desired_config", JSON, nullable=False, default=dict),
    # v2: the desired state authorizes a downgrade (a rollback); the last command counter used.
    Column("desired_allow_downgrade", Boolean, nullable=False, default=False),
    Column("command_counter", BigInteger, nullable=False, default=0),
    # v3: how far the device's clock seemed off at its last telemetry (receive time minus the
    # newest record's own time, so it includes the delivery delay).
    Column("clock_skew_s", Float),
)

telemetry = Table(
    "telemetry",
    metadata,
    Column("tenant", String(64), primary_key=True),
    Column("record_id", String(64), primary_key=True),
    Column("device_id", String(64), nullable=False, index=True),
    Column("at", DateTime(timezone=True), nullable=False, index=True),
    Column("model", String(200), nullable=False),
    Column("served_by", String(16), nullable=False),
    Column("ok", Boolean, nullable=False),
    Column("latency_ms", Float, nullable=False),
    Column("prompt_tokens", BigInteger, nullable=False),  # v7: BIGINT
    Column("completion_tokens", BigInteger, nullable=False),
    # v3: when the control plane stored it; health gates judge by this, not by device clocks.
    Column("received_at", DateTime(timezone=True)),
    # v3: the failure's code (client-side ones, like a full queue, are not the model's fault).
    Column("error", String(64)),
)

rollouts = Table(
    "rollouts",
    metadata,
    Column("rollout_id", String(32), primary_key=True),
    Column("tenant", String(64), nullable=False, index=True),
    Column("model", JSON, nullable=False),  # ModelRef
    Column("selector", JSON, nullable=False),
    Column("waves", JSON, nullable=False),  # cumulative percentages, e.g. [10, 50, 100]
    Column("failure_threshold", Float, nullable=False),
    Column("health_window_s", Float, nullable=False),
    Column("wave_timeout_s", Float, nullable=False),
    Column("max_concurrent", Integer, nullable=False),
    Column("max_error_rate", Float, nullable=False),
    Column("max_latency_ratio", Float, nullable=False),
    Column("state", String(16), nullable=False),
    Column("current_wave", Integer, nullable=False, default=0),
    Column("wave_started_at", DateTime(timezone=True)),
    Column("message", String(2000), nullable=False, default=""),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    # Which control-plane replica drives this rollout, and until when (renewed every tick).
    Column("lease_owner", String(64)),
    Column("lease_until", DateTime(timezone=True)),
    # v2: the target may be an older release than devices run (the operator said so).
    Column("allow_downgrade", Boolean, nullable=False, default=False),
    # v3: fewer requests than this in a device's health window: unknown, the wave waits.
    Column("min_samples", Integer, nullable=False, default=0),
    # Quality gate: how far a device's evaluation-set agreement may fall below the packager's.
    Column("max_eval_drop", Float, nullable=False, default=0.05),
    # v6: counts the driver's writes to this rollout's device rows; the driver keeps the rows it
    # wrote in memory and reads them again only when this moved under it (another replica drove).
    Column("devices_version", Integer, nullable=False, default=0),
)

rollout_devices = Table(
    "rollout_devices",
    metadata,
    Column("rollout_id", String(32), primary_key=True),
    Column("device_id", String(64), primary_key=True),
    Column("wave", Integer, nullable=False),
    Column("previous_model", JSON),
    Column("desired_revision", BigInteger, nullable=False, default=0),  # v7: BIGINT
    Column("state", String(16), nullable=False),
    Column("started_at", DateTime(timezone=True)),
    Column("active_at", DateTime(timezone=True)),
    Column("detail", String(2000), nullable=False, default=""),
)


# Operator console sign-ins (cloud/console): only a SHA-256 of the session token is stored, so a
# copy of the database opens no session; the key it came from is checked on every request.
console_sessions = Table(
    "console_sessions",
    metadata,
    Column("session_sha256", String(64), primary_key=True),
    Column("tenant", String(64), nullable=False),
    Column("key_id", String(32), nullable=False, index=True),
    Column("csrf_token", String(64), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False, index=True),
)

# What happened to a device, as the control plane saw it: presence, phase and model changes.
device_events = Table(
    "device_events",
    metadata,
    Column("event_id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("tenant", String(64), nullable=False),
    Column("device_id", String(64), nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("kind", String(16), nullable=False),  # status | phase | model
    Column("old", String(200)),
    Column("new", String(200)),
    Column("detail", String(500)),
    Index("ix_device_events_device", "tenant", "device_id", "event_id"),
)


_V2_COLUMNS = (
    (api_keys, "expires_at", "TIMESTAMP WITH TIME ZONE NULL", "DATETIME NULL"),
    (devices, "desired_allow_downgrade", "BOOLEAN NOT NULL DEFAULT FALSE", "BOOLEAN NOT NULL DEFAULT 0"),
    (devices, "command_counter", "BIGINT NOT NULL DEFAULT 0", "BIGINT NOT NULL DEFAULT 0"),
    (rollouts, "allow_downgrade", "BOOLEAN NOT NULL DEFAULT FALSE", "BOOLEAN NOT NULL DEFAULT 0"),
)


_V3_COLUMNS = (
    (telemetry, "received_at", "TIMESTAMP WITH TIME ZONE NULL", "DATETIME NULL"),
    (telemetry, "error", "VARCHAR(64) NULL", "VARCHAR(64) NULL"),
    (devices, "clock_skew_s", "DOUBLE PRECISION NULL", "FLOAT NULL"),
    (rollouts, "min_samples", "INTEGER NOT NULL DEFAULT 0", "INTEGER NOT NULL DEFAULT 0"),
)


def _v1_initial(conn: Connection) -> None:
    """The schema as released first, spelled out: a migration never reads today's tables (or a
    fresh database and a migrated one would drift apart as they change)."""
    v1 = MetaData()
    tz = DateTime(timezone=True)
    Table(
        "api_keys",
        v1,
        Column("key_id", String(32), primary_key=True),
        Column("tenant", String(64), nullable=False, index=True),
        Column("name", String(200), nullable=False),
        Column("scope", String(16), nullable=False),
        Column("secret_sha256", String(64), nullable=False),
        Column("created_at", tz, nullable=False),
        Column("revoked", Boolean, nullable=False, default=False),
    )
    Table(
        "devices",
        v1,
        Column("tenant", String(64), primary_key=True),
        Column("device_id", String(64), primary_key=True),
        Column("labels", JSON, nullable=False, default=dict),
        Column("status", String(16), nullable=False, default="unknown"),
        Column("last_seen", tz),
        Column("phase", String(32)),
        Column("active_model", String(200)),
        Column("reported_revision", Integer, nullable=False, default=-1),
        Column("reported", JSON),
        Column("desired_revision", Integer, nullable=False, default=0),
        Column("desired_model", JSON),
        Column("desired_config", JSON, nullable=False, default=dict),
    )
    Table(
        "telemetry",
        v1,
        Column("tenant", String(64), primary_key=True),
        Column("record_id", String(64), primary_key=True),
        Column("device_id", String(64), nullable=False, index=True),
        Column("at", tz, nullable=False, index=True),
        Column("model", String(200), nullable=False),
        Column("served_by", String(16), nullable=False),
        Column("ok", Boolean, nullable=False),
        Column("latency_ms", Float, nullable=False),
        Column("prompt_tokens", Integer, nullable=False),
        Column("completion_tokens", Integer, nullable=False),
    )
    Table(
        "rollouts",
        v1,
        Column("rollout_id", String(32), primary_key=True),
        Column("tenant", String(64), nullable=False, index=True),
        Column("model", JSON, nullable=False),
        Column("selector", JSON, nullable=False),
        Column("waves", JSON, nullable=False),
        Column("failure_threshold", Float, nullable=False),
        Column("health_window_s", Float, nullable=False),
        Column("wave_timeout_s", Float, nullable=False),
        Column("max_concurrent", Integer, nullable=False),
        Column("max_error_rate", Float, nullable=False),
        Column("max_latency_ratio", Float, nullable=False),
        Column("state", String(16), nullable=False),
        Column("current_wave", Integer, nullable=False, default=0),
        Column("wave_started_at", tz),
        Column("message", String(2000), nullable=False, default=""),
        Column("created_at", tz, nullable=False),
        Column("updated_at", tz, nullable=False),
        Column("lease_owner", String(64)),
        Column("lease_until", tz),
    )
    Table(
        "rollout_devices",
        v1,
        Column("rollout_id", String(32), primary_key=True),
        Column("device_id", String(64), primary_key=True),
        Column("wave", Integer, nullable=False),
        Column("previous_model", JSON),
        Column("desired_revision", Integer, nullable=False, default=0),
        Column("state", String(16), nullable=False),
        Column("started_at", tz),
        Column("active_at", tz),
        Column("detail", String(2000), nullable=False, default=""),
    )
    # Databases from before schema_migrations existed already hold these tables.
    v1.create_all(conn, checkfirst=True)


def _add_columns(conn: Connection, columns: tuple[tuple[Table, str, str, str], ...]) -> None:
    pg = conn.dialect.name == "postgresql"
    for table, column, pg_type, sqlite_type in columns:
        conn.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {column} {pg_type if pg else sqlite_type}"))


def _v2_trust(conn: Connection) -> None:
    """Key expiry, rollback authorization on desired states and rollouts, command counters."""
    _add_columns(conn, _V2_COLUMNS)


def _v3_cloud_time(conn: Connection) -> None:
    """Telemetry receive time, device clock skew, a minimum sample for health gates."""
    _add_columns(conn, _V3_COLUMNS)
    conn.execute(text("CREATE INDEX IF NOT EXISTS ix_telemetry_received_at ON telemetry (received_at)"))


def _v5_quality_gate(conn: Connection) -> None:
    """The rollouts' quality gate on the packages' evaluation sets."""
    _add_columns(
        conn,
        (
            (
                rollouts,
                "max_eval_drop",
                "DOUBLE PRECISION NOT NULL DEFAULT 0.05",
                "FLOAT NOT NULL DEFAULT 0.05",
            ),
        ),
    )


def _v6_devices_version(conn: Connection) -> None:
    """A change counter of each rollout's device rows (the driver's cache of them)."""
    _add_columns(
        conn, ((rollouts, "devices_version", "INTEGER NOT NULL DEFAULT 0", "INTEGER NOT NULL DEFAULT 0"),)
    )


def _v4_console(conn: Connection) -> None:
    """Console sessions and the device event history (cloud/console)."""
    v4 = MetaData()
    tz = DateTime(timezone=True)
    Table(
        "console_sessions",
        v4,
        Column("session_sha256", String(64), primary_key=True),
        Column("tenant", String(64), nullable=False),
        Column("key_id", String(32), nullable=False, index=True),
        Column("csrf_token", String(64), nullable=False),
        Column("created_at", tz, nullable=False),
        Column("expires_at", tz, nullable=False, index=True),
    )
    Table(
        "device_events",
        v4,
        Column(
            "event_id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
        ),
        Column("tenant", String(64), nullable=False),
        Column("device_id", String(64), nullable=False),
        Column("at", tz, nullable=False),
        Column("kind", String(16), nullable=False),
        Column("old", String(200)),
        Column("new", String(200)),
        Column("detail", String(500)),
        Index("ix_device_events_device", "tenant", "device_id", "event_id"),
    )
    v4.create_all(conn, checkfirst=True)


def _v7_wide_counters(conn: Connection) -> None:
    """Revisions and token counts as 64-bit integers on PostgreSQL (SQLite's INTEGER is already
    64 bits): the wire allows int64 revisions, and a report the database refused failed its
    whole ingest batch and came back with every resend."""
    if conn.dialect.name != "postgresql":
        return
    for table, column in (
        ("devices", "reported_revision"),
        ("devices", "desired_revision"),
        ("rollout_devices", "desired_revision"),
        ("telemetry", "prompt_tokens"),
        ("telemetry", "completion_tokens"),
    ):
        conn.execute(text(f"ALTER TABLE {table} ALTER COLUMN {column} TYPE BIGINT"))


# Append only: (version, name, function). A released migration is never edited.
MIGRATIONS: list[tuple[int, str, Callable[[Connection], None]]] = [
    (1, "initial schema", _v1_initial),
    (2, "signed control: key expiry, rollback authorization, command counters", _v2_trust),
    (3, "health on cloud time: telemetry receive time, clock skew, minimum samples", _v3_cloud_time),
    (4, "operator console: sessions, device event history", _v4_console),
    (5, "quality-gated rollouts: max_eval_drop", _v5_quality_gate),
    (6, "rollout driver's cache: devices_version", _v6_devices_version),
    (7, "64-bit revisions and token counts", _v7_wide_counters),
]


def make_engine(url: str) -> Engine:
    try:
        engine = create_engine(url, pool_pre_ping=True, future=True)
    except Exception as exc:  # bad URL, missing driver
        raise ConfigError(f"cannot use database URL: {exc}", url=_redact(url)) from exc
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: a killed process loses nothing committed; a power cut may lose the
            # last commits (production fleets use PostgreSQL).
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=10000")
            cur.close()

    return engine


def check_reachable(url: str) -> None:
    """ConfigError unless the database at ``url`` takes a connection (before a server starts:
    the same failure inside its lifespan would end in a traceback)."""
    engine = make_engine(url)
    try:
        with engine.connect():
            pass
    except SQLAlchemyError as exc:
        cause = getattr(exc, "orig", None) or exc
        raise ConfigError(
            f"cannot connect to the database: {str(cause).strip().splitlines()[0]}", url=_redact(url)
        ) from exc
    finally:
        engine.dispose()


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def migrate(engine: Engine) -> list[int]:
    """Apply missing migrations; returns the versions applied now."""
    applied_now: list[int] = []
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(727001)"))
        schema_migrations.create(conn, checkfirst=True)
        done = {row[0] for row in conn.execute(select(schema_migrations.c.version))}
        for version, name, fn in MIGRATIONS:
            if version in done:
                continue
            log.info("applying migration %d: %s", version, name)
            fn(conn)
            conn.execute(insert(schema_migrations).values(version=version, name=name, applied_at=utcnow()))
            applied_now.append(version)
    return applied_now


def schema_version(engine: Engine) -> int:
    with engine.connect() as conn:
        row = conn.execute(
            select(schema_migrations.c.version).order_by(schema_migrations.c.version.desc())
        ).first()
    return int(row[0]) if row else 0


def insert_ignore(engine: Engine, table: Table) -> Any:
    """INSERT … ON CONFLICT DO NOTHING for the engine's dialect (telemetry de-duplication)."""
    if engine.dialect.name == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    return sqlite.insert(table).on_conflict_do_nothing()


T = TypeVar("T")

# PostgreSQL aborts one of two transactions that wait on each other's rows (deadlock_detected),
# or that conflict under stricter isolation (serialization_failure): retrying it is the remedy.
_RETRIED_SQLSTATES = frozenset({"40P01", "40001"})


def in_transaction(engine: Engine, work: Callable[[Connection], T], attempts: int = 3) -> T:
    """``work`` in a transaction of its own, run again (up to ``attempts`` times) when the
    database aborted it to break a deadlock: two transactions that update many of the same
    device rows in different orders (a config push to the fleet, the ingest's batch)."""
    for attempt in range(1, attempts + 1):
        try:
            with engine.begin() as conn:
                return work(conn)
        except DBAPIError as exc:
            if getattr(exc.orig, "sqlstate", None) not in _RETRIED_SQLSTATES or attempt == attempts:
                raise
            log.info(
                "transaction aborted by the database (%s); attempt %d of %d", exc.orig, attempt + 1, attempts
            )
    raise AssertionError("unreachable")
