"""The fleet in the database: devices as they report themselves, their labels, desired states and
telemetry (de-duplicated by record id: devices deliver at least once)."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, and_, bindparam, delete, func, or_, select, update

from cloud.plane.store import (
    SerializedJSON,
    as_utc,
    device_events,
    devices,
    in_transaction,
    insert_ignore,
    telemetry,
    utcnow,
)
from shared.errors import ContractError, NotFound
from shared.ids import is_valid_name
from shared.messages import DesiredState, DeviceStatus, ModelRef, ReportedState, TelemetryBatch

# Telemetry errors that say nothing of a model's health: the device was busy, or the client left.
CLIENT_SIDE = ("queue_full", "stream_interrupted", "model_not_ready", "client_disconnected")

_EVENT_KIND = {"status": "status", "phase": "phase", "active_model": "model"}

# What the rollout driver reads of an ended update's report (DeviceProgress.outcome).
OUTCOME_KEYS = ("evaluation", "target_revision", "last_error")

# Device ids per IN (...) list: well under every database's limit on bound parameters.
_IN_CHUNK = 500


def previous_model(
    desired_model: dict[str, Any] | None, reported: dict[str, Any] | None
) -> dict[str, Any] | None:
    """What a rollback sends a device back to: the model the control plane last asked it to
    run, else the one it reports active (a device set up by hand before this control plane knew
    it has no desired model on record, and "no model" is no rollback)."""
    if desired_model:
        return desired_model
    report = reported or {}
    active = report.get("active_slot")
    model: dict[str, Any] | None = (report.get("slots") or {}).get(active) if active else None
    return model


def in_chunks(ids: Sequence[str]) -> Iterator[Sequence[str]]:
    """``ids`` in IN lists of at most ``_IN_CHUNK`` (SQLite and PostgreSQL cap bound parameters)."""
    for start in range(0, len(ids), _IN_CHUNK):
        yield ids[start : start + _IN_CHUNK]


_THIS_DEVICE = and_(devices.c.tenant == bindparam("b_tenant"), devices.c.device_id == bindparam("b_device"))
# Built once and run with many parameter sets (executemany): a batch of reports is one statement.
_SET_REPORTED = (
    update(devices)
    .where(_THIS_DEVICE)
    .values(
        phase=bindparam("b_phase"),
        active_model=bindparam("b_model"),
        reported_revision=bindparam("b_revision"),
        reported=bindparam("b_reported", type_=SerializedJSON()),
        last_seen=bindparam("b_seen"),
    )
)
_SET_STATUS = (
    update(devices).where(_THIS_DEVICE).values(status=bindparam("b_status"), last_seen=bindparam("b_seen"))
)
# Status, phase and model of some devices of a tenant: one statement for any number of ids (an
# expanding IN), so a batch of reports does not build, coerce and cache-key a new SELECT (with
# one report per batch, that was a third of the batch's CPU on SQLite).
_HISTORY_COLUMNS = select(
    devices.c.device_id, devices.c.status, devices.c.phase, devices.c.active_model
).where(
    and_(
        devices.c.tenant == bindparam("b_tenant"), devices.c.device_id.in_(bindparam("b_ids", expanding=True))
    )
)
_ADD_EVENTS = device_events.insert()
# What devices send the control plane stores: reports, status changes, telemetry.
DeviceMessage = ReportedState | DeviceStatus | TelemetryBatch

# A term is split at its operator first, and each side matched on its own: one pattern with an
# optional operator between overlapping classes backtracked quadratically on a term that fails
# ("aaa…a!": 32,000 characters held the control plane's event loop for 9 s).
_SELECTOR_OPERATOR = re.compile(r"==|!=|=")
_SELECTOR_KEY = re.compile(r"[A-Za-z0-9_.\-/]+")
_SELECTOR_VALUE = re.compile(r"[A-Za-z0-9_.\-]*")
# Longer than any selector of real labels (keys and values are names of at most 64 characters).
MAX_SELECTOR = 4096


@dataclass(frozen=True)
class Selector:
    """Kubernetes-style equality selector: ``zone=eu,tier!=canary,gpu`` (a bare key: label present)."""

    terms: tuple[tuple[str, str, str], ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> Selector:
        if not text or not text.strip():
            return cls()
        if len(text) > MAX_SELECTOR:
            raise ContractError(
                f"label selector longer than {MAX_SELECTOR} characters", selector=text[:64] + "…"
            )
        terms = []
        for part in text.split(","):
            op = _SELECTOR_OPERATOR.search(part)
            key = (part[: op.start()] if op else part).strip()
            value = part[op.end() :].strip() if op else ""
            if (
                not _SELECTOR_KEY.fullmatch(key)
                or not _SELECTOR_VALUE.fullmatch(value)
                or (op is not None and not value)
            ):
                shown = part if len(part) <= 80 else part[:80] + "…"
                raise ContractError(f"invalid label selector term {shown!r}", selector=text[:200])
            terms.append((key, "exists" if op is None else "=" if op.group() == "==" else op.group(), value))
        return cls(tuple(terms))

    def matches(self, labels: dict[str, str]) -> bool:
        for key, op, value in self.terms:
            if op == "exists" and key not in labels:
                return False
            if op == "=" and labels.get(key) != value:
                return False
            if op == "!=" and labels.get(key) == value:
                return False
        return True

    def __str__(self) -> str:
        return ",".join(k if op == "exists" else f"{k}{op}{v}" for k, op, v in self.terms)


@dataclass(frozen=True)
class DesiredRecord:
    """A desired state as recorded, to be signed and published once its transaction committed."""

    tenant: str
    device_id: str
    revision: int
    model: dict[str, Any] | None
    config: dict[str, Any]
    allow_downgrade: bool = False

    def message(self) -> DesiredState:
        return DesiredState(
            revision=self.revision,
            model=ModelRef.model_validate(self.model) if self.model else None,
            config=self.config,
            allow_downgrade=self.allow_downgrade,
        )


@dataclass(frozen=True)
class Device:
    tenant: str
    device_id: str
    labels: dict[str, str]
    status: str
    last_seen: datetime | None
    phase: str | None
    active_model: str | None
    reported_revision: int
    reported: dict[str, Any] | None
    desired_revision: int
    desired_model: dict[str, Any] | None
    desired_config: dict[str, Any]

    @classmethod
    def from_row(cls, row: Any) -> Device:
        m = row._mapping
        return cls(
            tenant=m["tenant"],
            device_id=m["device_id"],
            labels=dict(m["labels"] or {}),
            status=m["status"],
            last_seen=as_utc(m["last_seen"]),
            phase=m["phase"],
            active_model=m["active_model"],
            reported_revision=m["reported_revision"],
            reported=m["reported"],
            desired_revision=m["desired_revision"],
            desired_model=m["desired_model"],
            desired_config=dict(m["desired_config"] or {}),
        )

    def public(self) -> dict[str, Any]:
        last_error = (self.reported or {}).get("last_error")
        return {
            "device_id": self.device_id,
            "labels": self.labels,
            "status": self.status,
            "last_seen": self.last_seen.isoformat() if self.last_seen else None,
            "phase": self.phase,
            "active_model": self.active_model,
            "reported_revision": self.reported_revision,
            "desired_revision": self.desired_revision,
            "desired_model": self.desired_model,
            "desired_config": self.desired_config,
            "last_error": last_error,
            "config_error": (self.reported or {}).get("config_error"),
            # The last desired state or command the device refused (unsigned, expired, …), and why.
            "control_error": (self.reported or {}).get("control_error"),
            "capabilities": (self.reported or {}).get("capabilities"),
            # The evaluation set's result for the model it last activated (the quality gate's input).
            "evaluation": (self.reported or {}).get("evaluation"),
        }


@dataclass(frozen=True)
class DeviceProgress:
    """A device as the rollout driver sees it each tick."""

    device_id: str
    status: str
    last_seen: datetime | None
    phase: str | None
    active_model: str | None
    reported_revision: int
    # Only when the phase is failed, or active on the model asked about: the parts of its report
    # that say how the update ended (OUTCOME_KEYS: the evaluation for the quality gate, the
    # revision a failure was of and its error), those it holds.
    outcome: dict[str, Any] | None


@dataclass(frozen=True)
class DeviceSummary:
    """A device as one row of a fleet table."""

    device_id: str
    labels: dict[str, str]
    status: str
    last_seen: datetime | None
    phase: str | None
    active_model: str | None
    reported_revision: int
    desired_revision: int
    progress: float | None  # 0..1 of the transfer under way, if any
    last_error: str | None
    active_slot: str | None = None

    @classmethod
    def from_row(cls, row: Any) -> DeviceSummary:
        """From a row of ``Fleet.summaries``' columns, in their order (positional: a thousand
        rows per page view)."""
        device_id, labels, status, last_seen, phase, active_model, reported_rev, desired_rev = row
        return cls(
            device_id,
            labels or {},
            status,
            as_utc(last_seen),
            phase,
            active_model,
            reported_rev,
            desired_rev,
            None,
            None,
        )

    def with_report(self, reported: dict[str, Any] | None) -> DeviceSummary:
        """This row with the transfer progress and last error of the device's full report."""
        reported = reported or {}
        err = reported.get("last_error")
        prog = reported.get("progress")
        fraction = None
        if prog and prog.get("bytes_total"):
            fraction = min(1.0, prog.get("bytes_done", 0) / prog["bytes_total"])
        return replace(
            self,
            progress=fraction,
            last_error=f"{err.get('code')}: {err.get('message')}" if err else None,
            active_slot=reported.get("active_slot"),
        )


def active_model_of(reported: ReportedState) -> str | None:
    if reported.active_slot is None:
        return None
    ref = reported.slots.get(reported.active_slot)
    return f"{ref.name}:{ref.version}" if ref else None


class Fleet:
    def __init__(self, engine: Engine, clock: Callable[[], datetime] = utcnow) -> None:
        self.engine = engine
        # The cloud's clock: last seen and telemetry receive times (tests pass a fake one).
        self.clock = clock

    # -- ingestion (from MQTT) ----------------------------------------------------------------
    def _ensure(self, conn: Any, tenant: str, device_id: str) -> None:
        stmt = insert_ignore(self.engine, devices).values(
            tenant=tenant,
            device_id=device_id,
            labels={},
            status="unknown",
            reported_revision=-1,
            desired_revision=0,
            desired_config={},
        )
        conn.execute(stmt)

    def record_reported(self, tenant: str, reported: ReportedState) -> None:
        self.record([(tenant, reported)])

    def record_status(self, tenant: str, status: DeviceStatus) -> None:
        self.record([(tenant, status)])

    def record_telemetry(self, tenant: str, batch: TelemetryBatch) -> int:
        """Store new records; replays of records already stored are ignored. Returns rows added."""
        with self.engine.begin() as conn:
            return self._record_telemetry(conn, tenant, batch)

    def record(self, items: Sequence[tuple[str, DeviceMessage]]) -> None:
        """Store device messages (of any tenants, in arrival order) in one transaction.

        The ingest thread hands over everything that arrived while it wrote the previous batch:
        at fleet scale one transaction and a few statements per batch, not four per message
        (bench/RESULTS.md, rollout_scale.py)."""
        with self.engine.begin() as conn:
            states = [(t, m) for t, m in items if not isinstance(m, TelemetryBatch)]
            if states:
                self._record_states(conn, states)
            for tenant, message in items:
                if isinstance(message, TelemetryBatch):
                    self._record_telemetry(conn, tenant, message)

    def _record_states(
        self, conn: Connection, items: Sequence[tuple[str, ReportedState | DeviceStatus]]
    ) -> None:
        now = self.clock()
        current = self._history_columns(conn, {(t, m.device_id) for t, m in items})
        events: list[dict[str, Any]] = []
        reported_rows: list[dict[str, Any]] = []
        status_rows: list[dict[str, Any]] = []
        for tenant, m in items:
            detail = None
            if isinstance(m, ReportedState):
                new: dict[str, str | None] = {"phase": m.phase.value, "active_model": active_model_of(m)}
                err = m.last_error
                if err is not None and m.phase.value == "failed":
                    detail = f"{err.code}: {err.message}"
                reported_rows.append(
                    {
                        "b_tenant": tenant,
                        "b_device": m.device_id,
                        "b_phase": new["phase"],
                        "b_model": new["active_model"],
                        "b_revision": m.revision,
                        "b_reported": m.model_dump_json(by_alias=True),
                        "b_seen": now,
                    }
                )
            else:
                new = {"status": m.state}
                status_rows.append(
                    {"b_tenant": tenant, "b_device": m.device_id, "b_status": m.state, "b_seen": now}
                )
            # The history the console shows: each of status, phase and model that changed.
            old = current[(tenant, m.device_id)]
            for k, v in new.items():
                if old.get(k) != v:
                    events.append(
                        {
                            "tenant": tenant,
                            "device_id": m.device_id,
                            "at": now,
                            "kind": _EVENT_KIND[k],
                            "old": old.get(k),
                            "new": v,
                            "detail": (detail or "")[:500] or None,
                        }
                    )
                    old[k] = v
        if events:
            conn.execute(_ADD_EVENTS, events)
        if reported_rows:
            conn.execute(_SET_REPORTED, reported_rows)
        if status_rows:
            conn.execute(_SET_STATUS, status_rows)

    def _history_columns(
        self, conn: Connection, keys: set[tuple[str, str]]
    ) -> dict[tuple[str, str], dict[str, str | None]]:
        """Status, phase and model of each (tenant, device); devices not seen before are created."""
        found: dict[tuple[str, str], dict[str, str | None]] = {}
        for tenant in {t for t, _ in keys}:
            ids = sorted(d for t, d in keys if t == tenant)
            for chunk in in_chunks(ids):
                rows = conn.execute(_HISTORY_COLUMNS, {"b_tenant": tenant, "b_ids": list(chunk)})
                for device_id, status, phase, model in rows:
                    found[(tenant, device_id)] = {"status": status, "phase": phase, "active_model": model}
        missing = keys - found.keys()
        if missing:
            conn.execute(
                insert_ignore(self.engine, devices),
                [
                    {
                        "tenant": t,
                        "device_id": d,
                        "labels": {},
                        "status": "unknown",
                        "reported_revision": -1,
                        "desired_revision": 0,
                        "desired_config": {},
                    }
                    for t, d in sorted(missing)
                ],
            )
            for key in missing:
                found[key] = {"status": "unknown", "phase": None, "active_model": None}
        return found

    def _record_telemetry(self, conn: Connection, tenant: str, batch: TelemetryBatch) -> int:
        """Each row keeps the cloud's receive time beside the device's own: health gates judge by
        the former, whatever the device's clock says."""
        received = self.clock()
        rows = [
            {
                "tenant": tenant,
                "record_id": r.id,
                "device_id": batch.device_id,
                "at": r.at,
                "model": r.model,
                "served_by": r.served_by,
                "ok": r.ok,
                "latency_ms": r.latency_ms,
                "prompt_tokens": r.prompt_tokens,
                "completion_tokens": r.completion_tokens,
                "received_at": received,
                "error": r.error[:64] if r.error else None,
            }
            for r in batch.records
        ]
        skew = (received - max(as_utc(r.at) or received for r in batch.records)).total_seconds()
        self._ensure(conn, tenant, batch.device_id)
        # Records stored before (a batch sent again: its acknowledgement was lost) are left out
        # first, and the rest go in one statement: one INSERT per record held the ingest thread,
        # and every other device's reports behind it, while one device replayed its batches.
        ids = [row["record_id"] for row in rows]
        seen = set(
            conn.execute(
                select(telemetry.c.record_id).where(
                    telemetry.c.tenant == tenant, telemetry.c.record_id.in_(ids)
                )
            ).scalars()
        )
        fresh = list({row["record_id"]: row for row in rows if row["record_id"] not in seen}.values())
        if fresh:
            # Ignore-on-conflict still: another replica may store the same records meanwhile.
            conn.execute(insert_ignore(self.engine, telemetry), fresh)
        added = len(fresh)
        conn.execute(
            update(devices)
            .where(and_(devices.c.tenant == tenant, devices.c.device_id == batch.device_id))
            .values(clock_skew_s=skew)
        )
        return added

    def prune(self, before: datetime) -> tuple[int, int]:
        """Delete telemetry received before ``before`` (or, for records stored before receive
        times were kept, dated before it) and device events before it; (records, events)."""
        with self.engine.begin() as conn:
            records = conn.execute(
                delete(telemetry).where(
                    or_(
                        telemetry.c.received_at < before,
                        and_(telemetry.c.received_at.is_(None), telemetry.c.at < before),
                    )
                )
            ).rowcount
            events = conn.execute(delete(device_events).where(device_events.c.at < before)).rowcount
        return int(records or 0), int(events or 0)

    # -- queries --------------------------------------------------------------------------------
    def list_devices(
        self, tenant: str, selector: Selector | None = None, *, after: str = "", limit: int | None = None
    ) -> list[Device]:
        """The tenant's devices ``selector`` matches, by id: those after ``after``, at most
        ``limit`` of them (a page; the next starts after the last one's id)."""
        query = select(devices).where(devices.c.tenant == tenant).order_by(devices.c.device_id)
        if after:
            query = query.where(devices.c.device_id > after)
        found: list[Device] = []
        with self.engine.connect() as conn:
            # Streamed, so that a page of a large fleet reads only as far as it needs.
            for row in conn.execution_options(yield_per=1_000).execute(query):
                device = Device.from_row(row)
                if selector is None or selector.matches(device.labels):
                    found.append(device)
                    if limit is not None and len(found) >= limit:
                        break
        return found

    def matching(self, tenant: str, selector: Selector) -> list[str]:
        """The ids of the tenant's devices ``selector`` matches, in order (their labels only)."""
        return list(self._matching(tenant, selector))

    def _matching(self, tenant: str, selector: Selector) -> dict[str, dict[str, Any] | None]:
        """The devices ``selector`` matches, each with its desired model on record."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(devices.c.device_id, devices.c.labels, devices.c.desired_model)
                .where(devices.c.tenant == tenant)
                .order_by(devices.c.device_id)
            ).all()
        return {d: desired for d, labels, desired in rows if selector.matches(labels or {})}

    def rollout_targets(self, tenant: str, selector: Selector) -> dict[str, dict[str, Any] | None]:
        """The devices ``selector`` matches, each with the model a rollback sends it back to
        (:func:`previous_model`). Only the columns that takes: a device's report is read only
        when the control plane has no desired model on record for it (creating a rollout of
        10,000 devices parsed 10,000 reports)."""
        out = self._matching(tenant, selector)
        unknown = [d for d, desired in out.items() if not desired]
        with self.engine.connect() as conn:
            for chunk in in_chunks(unknown):
                for device_id, reported in conn.execute(
                    select(devices.c.device_id, devices.c.reported).where(
                        and_(devices.c.tenant == tenant, devices.c.device_id.in_(chunk))
                    )
                ):
                    out[device_id] = previous_model(None, reported)
        return out

    def progress(
        self,
        tenant: str,
        device_ids: Collection[str],
        target: str,
        *,
        overdue: Collection[str] = (),
    ) -> dict[str, DeviceProgress]:
        """What the rollout driver checks each tick of the devices it waits on to update to
        ``target`` (``name:version``): those of ``device_ids`` whose update has ended — failed,
        or active on the target — with their report (the failure's revision and error, the
        evaluation for the quality gate); and those of ``overdue`` whatever their state (their
        wave timeout passed: the driver says how they were last seen). A device still on its
        way is not read: a tick of a 10,000-device wave in which a few devices reported reads
        about those few rows, and the database filters the rest."""
        wanted_ids = set(device_ids)
        columns = select(
            devices.c.device_id,
            devices.c.status,
            devices.c.last_seen,
            devices.c.phase,
            devices.c.active_model,
            devices.c.reported_revision,
        )
        ended = or_(
            devices.c.phase == "failed", and_(devices.c.phase == "active", devices.c.active_model == target)
        )
        with self.engine.connect() as conn:
            if len(wanted_ids) > _IN_CHUNK:
                # Most of a large wave: one pass over the tenant's ended updates costs less than
                # many IN lists (the devices of earlier waves are dropped here).
                rows = {
                    r.device_id: r
                    for r in conn.execute(columns.where(and_(devices.c.tenant == tenant, ended)))
                    if r.device_id in wanted_ids
                }
            else:
                rows = {
                    r.device_id: r
                    for r in conn.execute(
                        columns.where(
                            and_(
                                devices.c.tenant == tenant, devices.c.device_id.in_(sorted(wanted_ids)), ended
                            )
                        )
                    )
                }
            for ids in in_chunks(sorted(set(overdue) - rows.keys())):
                rows.update(
                    (r.device_id, r)
                    for r in conn.execute(
                        columns.where(and_(devices.c.tenant == tenant, devices.c.device_id.in_(ids)))
                    )
                )
            asked = sorted(
                r.device_id
                for r in rows.values()
                if r.phase == "failed" or (r.phase == "active" and r.active_model == target)
            )
            # Those parts only, extracted by the database: parsing every ended device's whole
            # report was most of this method's time in a 10,000-device rollout (py-spy).
            parts = [devices.c.reported[key].label(key) for key in OUTCOME_KEYS]
            outcomes: dict[str, dict[str, Any]] = {}
            for ids in in_chunks(asked):
                for device_id, *values in conn.execute(
                    select(devices.c.device_id, *parts).where(
                        and_(devices.c.tenant == tenant, devices.c.device_id.in_(ids))
                    )
                ):
                    outcomes[device_id] = {
                        key: value
                        for key, value in zip(OUTCOME_KEYS, values, strict=True)
                        if value is not None
                    }
        return {
            r.device_id: DeviceProgress(
                r.device_id,
                r.status,
                as_utc(r.last_seen),
                r.phase,
                r.active_model,
                r.reported_revision,
                outcomes.get(r.device_id),
            )
            for r in rows.values()
        }

    def exists(self, tenant: str, device_id: str, *, conn: Connection) -> bool:
        where = and_(devices.c.tenant == tenant, devices.c.device_id == device_id)
        return conn.execute(select(devices.c.device_id).where(where)).first() is not None

    def get(self, tenant: str, device_id: str) -> Device:
        if not is_valid_name(device_id):
            # No device has such an id (PostgreSQL refuses a NUL in a query's text: a 500).
            raise NotFound("no such device", device_id=device_id)
        with self.engine.connect() as conn:
            row = conn.execute(
                select(devices).where(and_(devices.c.tenant == tenant, devices.c.device_id == device_id))
            ).first()
        if row is None:
            raise NotFound("no such device", device_id=device_id)
        return Device.from_row(row)

    def set_labels(
        self, tenant: str, device_id: str, labels: dict[str, str], *, replace: bool = False
    ) -> Device:
        for key, value in labels.items():
            # Which half is wrong: "k=v v" was reported against the key.
            if not is_valid_name(key.replace("/", "-")):
                raise ContractError(
                    "a label key is a name: letters, digits, '.', '_', '-' (and '/'), starting with a "
                    "letter or digit, at most 64",
                    label=key,
                )
            if value and not is_valid_name(value):
                raise ContractError(
                    f"the value of label {key!r} is not a name: letters, digits, '.', '_', '-', "
                    "starting with a letter or digit, at most 64",
                    label=key,
                )
        where = and_(devices.c.tenant == tenant, devices.c.device_id == device_id)
        # Read and write in one transaction holding the row, or two concurrent merges lose one.
        with self.engine.begin() as conn:
            if conn.dialect.name == "sqlite":
                # Take SQLite's write lock before reading (a no-op write); it waits on busy_timeout.
                conn.execute(update(devices).where(where).values(labels=devices.c.labels))
            query = select(devices.c.labels).where(where)
            if conn.dialect.name == "postgresql":
                query = query.with_for_update()
            current = conn.execute(query).first()
            if current is None:
                raise NotFound("no such device", device_id=device_id)
            merged = dict(labels) if replace else {**(current.labels or {}), **labels}
            merged = {k: v for k, v in merged.items() if v != ""}  # an empty value removes the label
            conn.execute(update(devices).where(where).values(labels=merged))
        return self.get(tenant, device_id)

    def next_desired(
        self,
        tenant: str,
        device_id: str,
        *,
        model: ModelRef | None = None,
        keep_model: bool = False,
        config: dict[str, Any] | None = None,
        allow_downgrade: bool = False,
        conn: Connection | None = None,
    ) -> DesiredRecord:
        """Record a new desired state; ``keep_model`` keeps the model (and its rollback
        authorization), ``config=None`` the config. Returns what to publish. Runs in ``conn``'s
        transaction when given."""
        if conn is None:
            with self.engine.begin() as own:
                return self.next_desired(
                    tenant,
                    device_id,
                    model=model,
                    keep_model=keep_model,
                    config=config,
                    allow_downgrade=allow_downgrade,
                    conn=own,
                )
        self._ensure(conn, tenant, device_id)
        where = and_(devices.c.tenant == tenant, devices.c.device_id == device_id)
        conn.execute(update(devices).where(where).values(desired_revision=devices.c.desired_revision + 1))
        row = conn.execute(select(devices).where(where)).first()
        assert row is not None
        m = row._mapping
        if keep_model:
            new_model, downgrade = m["desired_model"], bool(m["desired_allow_downgrade"])
        else:
            new_model = model.model_dump(mode="json") if model is not None else None
            downgrade = allow_downgrade
        new_config = m["desired_config"] if config is None else config
        conn.execute(
            update(devices)
            .where(where)
            .values(desired_model=new_model, desired_config=new_config, desired_allow_downgrade=downgrade)
        )
        return DesiredRecord(
            tenant, device_id, int(m["desired_revision"]), new_model, dict(new_config or {}), downgrade
        )

    def next_desired_many(
        self,
        tenant: str,
        device_ids: Sequence[str],
        *,
        model: ModelRef | None,
        allow_downgrade: bool,
        conn: Connection,
    ) -> list[DesiredRecord]:
        """:meth:`next_desired` for many devices (the same model, each keeping its config), a few
        statements per 500 devices: how a wave of 10,000 starts."""
        new_model = model.model_dump(mode="json") if model is not None else None
        out: dict[str, DesiredRecord] = {}
        for chunk in in_chunks(device_ids):
            where = and_(devices.c.tenant == tenant, devices.c.device_id.in_(chunk))
            conn.execute(
                update(devices)
                .where(where)
                .values(
                    desired_revision=devices.c.desired_revision + 1,
                    desired_model=new_model,
                    desired_allow_downgrade=allow_downgrade,
                )
            )
            for device_id, revision, config in conn.execute(
                select(devices.c.device_id, devices.c.desired_revision, devices.c.desired_config).where(where)
            ):
                out[device_id] = DesiredRecord(
                    tenant, device_id, int(revision), new_model, dict(config or {}), allow_downgrade
                )
        return [
            out[d]
            if d in out
            else self.next_desired(tenant, d, model=model, allow_downgrade=allow_downgrade, conn=conn)
            for d in device_ids
        ]

    def next_config_many(
        self, tenant: str, device_ids: Sequence[str], config: dict[str, Any]
    ) -> list[DesiredRecord]:
        """:meth:`next_desired` with ``keep_model`` for many known devices, one config for all, a
        few statements per 500 devices: a config pushed to a fleet of 10,000 in 20 short
        transactions (each retried if the database breaks a deadlock with the ingest's batch)."""

        def record(conn: Connection, chunk: Sequence[str]) -> list[DesiredRecord]:
            where = and_(devices.c.tenant == tenant, devices.c.device_id.in_(chunk))
            conn.execute(
                update(devices)
                .where(where)
                .values(desired_revision=devices.c.desired_revision + 1, desired_config=config)
            )
            rows = conn.execute(
                select(
                    devices.c.device_id,
                    devices.c.desired_revision,
                    devices.c.desired_model,
                    devices.c.desired_allow_downgrade,
                ).where(where)
            )
            return [
                DesiredRecord(tenant, device_id, int(revision), model, dict(config), bool(downgrade))
                for device_id, revision, model, downgrade in rows
            ]

        out: dict[str, DesiredRecord] = {}
        for chunk in in_chunks(device_ids):
            out.update(
                (r.device_id, r) for r in in_transaction(self.engine, functools.partial(record, chunk=chunk))
            )
        return [out[d] for d in device_ids if d in out]

    def current_desired(self, tenant: str, device_id: str) -> DesiredRecord | None:
        """The desired state last recorded for a device (to publish it again), if any."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(devices).where(and_(devices.c.tenant == tenant, devices.c.device_id == device_id))
            ).first()
        if row is None or row._mapping["desired_revision"] < 1:
            return None
        m = row._mapping
        return DesiredRecord(
            tenant,
            device_id,
            int(m["desired_revision"]),
            m["desired_model"],
            dict(m["desired_config"] or {}),
            bool(m["desired_allow_downgrade"]),
        )

    def next_command_counter(self, tenant: str, device_id: str) -> int:
        """A new command counter for the device: above every one issued (by any replica)."""
        with self.engine.begin() as conn:
            self._ensure(conn, tenant, device_id)
            where = and_(devices.c.tenant == tenant, devices.c.device_id == device_id)
            conn.execute(update(devices).where(where).values(command_counter=devices.c.command_counter + 1))
            return int(conn.execute(select(devices.c.command_counter).where(where)).scalar_one())

    def health(
        self, tenant: str, device_id: str, model: str, since: datetime
    ) -> tuple[int, int, float | None]:
        """(requests, errors, median latency ms) of ``model`` served on the device since ``since``,
        by the cloud's receive time (a device clock hours off changes nothing).

        Requests the device handed to the cloud say nothing of its model's health and are left
        out, and so are client-side events (a full queue, a client that went away)."""
        return self.health_many(tenant, [(device_id, model, since)])[0]

    def health_many(
        self, tenant: str, asks: list[tuple[str, str, datetime]]
    ) -> list[tuple[int, int, float | None]]:
        """``health`` for each (device, model, since) of ``asks``, in one query (a rollout tick
        judges a whole wave at once)."""
        if not asks:
            return []
        when = func.coalesce(telemetry.c.received_at, telemetry.c.at)
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(
                    telemetry.c.device_id, telemetry.c.model, telemetry.c.ok, telemetry.c.latency_ms, when
                ).where(
                    and_(
                        telemetry.c.tenant == tenant,
                        telemetry.c.device_id.in_({d for d, _, _ in asks}),
                        telemetry.c.model.in_({m for _, m, _ in asks}),
                        telemetry.c.served_by == "local",
                        when >= min(since for _, _, since in asks),
                        or_(
                            telemetry.c.ok.is_(True),
                            telemetry.c.error.is_(None),
                            telemetry.c.error.notin_(CLIENT_SIDE),
                        ),
                    )
                )
            ).all()
        by_key: dict[tuple[str, str], list[tuple[bool, float, datetime]]] = {}
        for device_id, model, ok, latency, at in rows:
            by_key.setdefault((device_id, model), []).append((bool(ok), float(latency), as_utc(at) or at))
        out = []
        for device_id, model, since in asks:
            mine = [(ok, lat) for ok, lat, at in by_key.get((device_id, model), []) if at >= since]
            errors = sum(1 for ok, _ in mine if not ok)
            latencies = sorted(lat for ok, lat in mine if ok)
            out.append((len(mine), errors, latencies[len(latencies) // 2] if latencies else None))
        return out

    def events(self, tenant: str, device_id: str, limit: int = 50) -> list[dict[str, Any]]:
        """The device's latest events, newest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(device_events)
                .where(and_(device_events.c.tenant == tenant, device_events.c.device_id == device_id))
                .order_by(device_events.c.event_id.desc())
                .limit(limit)
            ).all()
        return [{**r._mapping, "at": as_utc(r._mapping["at"])} for r in rows]

    def summaries(self, tenant: str) -> list[DeviceSummary]:
        """Every device of the tenant with what a fleet table filters and sorts on, without the
        full reports (parsing a thousand of them is most of a page's time): ``reports`` adds
        them for the rows shown."""
        cols = (
            devices.c.device_id,
            devices.c.labels,
            devices.c.status,
            devices.c.last_seen,
            devices.c.phase,
            devices.c.active_model,
            devices.c.reported_revision,
            devices.c.desired_revision,
        )
        with self.engine.connect() as conn:
            rows = conn.execute(select(*cols).where(devices.c.tenant == tenant)).all()
        return [DeviceSummary.from_row(r) for r in rows]

    def status_counts(self, tenant: str) -> dict[str, int]:
        """How many devices of the tenant are in each status, counted by the database (what the
        metrics endpoint reports at every scrape, whatever the fleet's size)."""
        return self._count_by(tenant, devices.c.status)

    def phase_counts(self, tenant: str) -> dict[str, int]:
        """How many devices of the tenant last reported each update phase (none yet: absent)."""
        return self._count_by(tenant, devices.c.phase)

    def _count_by(self, tenant: str, column: Any) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(column, func.count())
                .where(and_(devices.c.tenant == tenant, column.is_not(None)))
                .group_by(column)
            ).all()
        return {str(value): int(n) for value, n in rows}

    def with_reports(self, tenant: str, rows: list[DeviceSummary]) -> list[DeviceSummary]:
        """``rows`` with their progress and last error, from one query for just these devices."""
        if not rows:
            return rows
        with self.engine.connect() as conn:
            found = dict(
                conn.execute(
                    select(devices.c.device_id, devices.c.reported).where(
                        and_(devices.c.tenant == tenant, devices.c.device_id.in_([r.device_id for r in rows]))
                    )
                ).all()
            )
        return [r.with_report(found.get(r.device_id)) for r in rows]

    def telemetry_rows(
        self, tenant: str, device_id: str, since: datetime
    ) -> list[tuple[datetime, str, bool, float, int]]:
        """(receive time, served_by, ok, latency ms, completion tokens) of the device's records
        since ``since``, by the cloud's receive time."""
        when = func.coalesce(telemetry.c.received_at, telemetry.c.at)
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(
                    when,
                    telemetry.c.served_by,
                    telemetry.c.ok,
                    telemetry.c.latency_ms,
                    telemetry.c.completion_tokens,
                ).where(and_(telemetry.c.tenant == tenant, telemetry.c.device_id == device_id, when >= since))
            ).all()
        return [(as_utc(at) or at, sb, bool(ok), float(lat), int(ct)) for at, sb, ok, lat, ct in rows]

    def telemetry_count(self, tenant: str, device_id: str | None = None) -> int:
        cond = telemetry.c.tenant == tenant
        if device_id is not None:
            cond = and_(cond, telemetry.c.device_id == device_id)
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(telemetry).where(cond)).scalar_one())

    def uses_model(self, tenant: str, name: str, version: str) -> list[str]:
        """Devices whose desired model is ``name:version``."""
        out = []
        for d in self.list_devices(tenant):
            m = d.desired_model or {}
            if m.get("name") == name and m.get("version") == version:
                out.append(d.device_id)
        return out
