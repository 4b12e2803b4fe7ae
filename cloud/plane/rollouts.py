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
"""

from __future__ import annotations

import hashlib
import logging
import math
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection, Engine, and_, or_, select, update

from cloud.plane.fleet import DesiredRecord, Device, Fleet, Selector
from cloud.plane.store import as_utc, rollout_devices, rollouts, utcnow
from shared.errors import ContractError, NotFound
from shared.messages import ModelRef

log = logging.getLogger(__name__)


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
OPEN_DEVICE_STATES = ("pending", "updating", "active")
TOUCHED_DEVICE_STATES = ("updating", "active", "healthy", "failed")


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


class Rollouts:
    def __init__(self, engine: Engine, fleet: Fleet) -> None:
        self.engine = engine
        self.fleet = fleet

    # -- operator actions -------------------------------------------------------------------------
    def create(self, tenant: str, spec: RolloutSpec) -> dict[str, Any]:
        spec.validate()
        selector = Selector.parse(spec.selector)
        targets = self.fleet.list_devices(tenant, selector)
        if not targets:
            raise ContractError(f"no device matches the selector {spec.selector!r}", selector=spec.selector)
        waves = assign_waves([d.device_id for d in targets], spec.waves)
        rid = uuid.uuid4().hex[:12]
        now = utcnow()
        with self.engine.begin() as conn:
            conn.execute(
                rollouts.insert().values(
                    rollout_id=rid,
                    tenant=tenant,
                    model=spec.model.model_dump(mode="json"),
                    selector=str(selector),
                    waves=list(spec.waves),
                    failure_threshold=spec.failure_threshold,
                    health_window_s=spec.health_window_s,
                    wave_timeout_s=spec.wave_timeout_s,
                    max_concurrent=spec.max_concurrent,
                    max_error_rate=spec.max_error_rate,
                    max_latency_ratio=spec.max_latency_ratio,
                    allow_downgrade=spec.allow_downgrade,
                    min_samples=spec.min_samples,
                    state=RolloutState.RUNNING.value,
                    current_wave=0,
                    wave_started_at=now,
                    message="",
                    created_at=now,
                    updated_at=now,
                )
            )
            for d in targets:
                conn.execute(
                    rollout_devices.insert().values(
                        rollout_id=rid,
                        device_id=d.device_id,
                        wave=waves[d.device_id],
                        previous_model=d.desired_model,
                        desired_revision=0,
                        state="pending",
                        detail="",
                    )
                )
        log.info(
            "rollout %s: %s to %d device(s) in %d wave(s)",
            rid,
            spec.model.name,
            len(targets),
            len(spec.waves),
        )
        return self.show(tenant, rid)

    def _row(self, conn: Connection, tenant: str, rid: str, lock: bool = False) -> Any:
        stmt = select(rollouts).where(and_(rollouts.c.tenant == tenant, rollouts.c.rollout_id == rid))
        if lock and self.engine.dialect.name == "postgresql":
            stmt = stmt.with_for_update()
        row = conn.execute(stmt).first()
        if row is None:
            raise NotFound("no such rollout", rollout_id=rid)
        return row._mapping

    def _set_state(
        self, tenant: str, rid: str, allowed: tuple[RolloutState, ...], to: RolloutState, msg: str
    ) -> dict[str, Any]:
        with self.engine.begin() as conn:
            row = self._row(conn, tenant, rid, lock=True)
            if row["state"] not in allowed:
                raise ContractError(
                    f"rollout is {row['state']}; this needs one of {', '.join(allowed)}", rollout_id=rid
                )
            conn.execute(
                update(rollouts)
                .where(rollouts.c.rollout_id == rid)
                .values(state=to.value, message=msg, updated_at=utcnow())
            )
        return self.show(tenant, rid)

    def pause(self, tenant: str, rid: str) -> dict[str, Any]:
        return self._set_state(
            tenant, rid, (RolloutState.RUNNING,), RolloutState.PAUSED, "paused by operator"
        )

    def resume(self, tenant: str, rid: str) -> dict[str, Any]:
        return self._set_state(
            tenant, rid, (RolloutState.PAUSED,), RolloutState.RUNNING, "resumed by operator"
        )

    def abort(self, tenant: str, rid: str) -> dict[str, Any]:
        """Stop where it is: devices keep what they run now; nothing more is sent."""
        return self._set_state(
            tenant,
            rid,
            (RolloutState.RUNNING, RolloutState.PAUSED),
            RolloutState.ABORTED,
            "aborted by operator",
        )

    def rollback(self, tenant: str, rid: str) -> dict[str, Any]:
        """Send every device this rollout touched back to its previous model (done by the driver)."""
        allowed = (
            RolloutState.RUNNING,
            RolloutState.PAUSED,
            RolloutState.HALTED,
            RolloutState.ABORTED,
            RolloutState.COMPLETED,
        )
        return self._set_state(
            tenant, rid, allowed, RolloutState.ROLLING_BACK, "rollback requested by operator"
        )

    def in_use(self, tenant: str, name: str, version: str) -> list[str]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(rollouts.c.rollout_id, rollouts.c.model).where(
                    and_(rollouts.c.tenant == tenant, rollouts.c.state.in_([s.value for s in IN_USE]))
                )
            ).all()
        return [r[0] for r in rows if r[1].get("name") == name and r[1].get("version") == version]

    # -- views ----------------------------------------------------------------------------------------
    def list(self, tenant: str) -> list[dict[str, Any]]:
        """Every rollout of ``tenant``, oldest first: two queries, however many there are."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(rollouts).where(rollouts.c.tenant == tenant).order_by(rollouts.c.created_at)
            ).all()
            devs = conn.execute(
                select(rollout_devices)
                .where(rollout_devices.c.rollout_id.in_([r._mapping["rollout_id"] for r in rows]))
                .order_by(rollout_devices.c.device_id)
            ).all()
        by_rollout: dict[str, list[Any]] = {}
        for d in devs:
            by_rollout.setdefault(d._mapping["rollout_id"], []).append(d._mapping)
        return [_view(r._mapping, by_rollout.get(r._mapping["rollout_id"], [])) for r in rows]

    def show(self, tenant: str, rid: str) -> dict[str, Any]:
        with self.engine.connect() as conn:
            row = self._row(conn, tenant, rid)
            devs = conn.execute(
                select(rollout_devices)
                .where(rollout_devices.c.rollout_id == rid)
                .order_by(rollout_devices.c.device_id)
            ).all()
        return _view(row, [d._mapping for d in devs])


def _view(row: Any, devs: list[Any]) -> dict[str, Any]:
    """A rollout as the REST API shows it (cloud/plane/views.py RolloutView)."""
    waves = []
    for i, pct in enumerate(row["waves"]):
        members = [d for d in devs if d["wave"] == i]
        counts: dict[str, int] = {}
        for m in members:
            counts[m["state"]] = counts.get(m["state"], 0) + 1
        waves.append({"index": i, "percent": pct, "devices": len(members), "states": counts})
    return {
        "rollout_id": row["rollout_id"],
        "model": row["model"],
        "selector": row["selector"],
        "state": row["state"],
        "current_wave": row["current_wave"],
        "message": row["message"],
        "failure_threshold": row["failure_threshold"],
        "health_window_s": row["health_window_s"],
        "wave_timeout_s": row["wave_timeout_s"],
        "max_concurrent": row["max_concurrent"],
        "allow_downgrade": bool(row["allow_downgrade"]),
        "min_samples": row["min_samples"],
        "created_at": as_utc(row["created_at"]).isoformat(),  # type: ignore[union-attr]
        "updated_at": as_utc(row["updated_at"]).isoformat(),  # type: ignore[union-attr]
        "driver": row["lease_owner"],
        "waves": waves,
        "devices": [
            {"device_id": d["device_id"], "wave": d["wave"], "state": d["state"], "detail": d["detail"]}
            for d in devs
        ],
    }


@dataclass
class RolloutDriver:
    """Ticks every rollout this replica can lease; returns the desired states to publish."""

    engine: Engine
    fleet: Fleet
    owner: str
    lease_s: float = 15.0
    drives: int = 0
    failures: int = 0
    last_publish: dict[tuple[str, str], datetime] = field(default_factory=dict)

    def tick(self) -> list[DesiredRecord]:
        out: list[DesiredRecord] = []
        with self.engine.connect() as conn:
            ids = conn.execute(
                select(rollouts.c.rollout_id, rollouts.c.tenant).where(
                    rollouts.c.state.in_([s.value for s in DRIVEN])
                )
            ).all()
        for rid, tenant in ids:
            out.extend(self._drive_isolated(tenant, rid))
        return out

    def _drive_isolated(self, tenant: str, rid: str) -> list[DesiredRecord]:
        """One rollout's step; its failure is logged and counted, and the other rollouts (of every
        tenant) are still driven in this tick."""
        try:
            return self._drive(tenant, rid) if self._lease(rid) else []
        except Exception:
            self.failures += 1
            log.exception("driving rollout %s of tenant %s failed; the other rollouts go on", rid, tenant)
            return []

    def _lease(self, rid: str) -> bool:
        now = utcnow()
        with self.engine.begin() as conn:
            result = conn.execute(
                update(rollouts)
                .where(
                    and_(
                        rollouts.c.rollout_id == rid,
                        rollouts.c.state.in_([s.value for s in DRIVEN]),
                        or_(
                            rollouts.c.lease_owner.is_(None),
                            rollouts.c.lease_owner == self.owner,
                            rollouts.c.lease_until < now,
                        ),
                    )
                )
                .values(lease_owner=self.owner, lease_until=now + timedelta(seconds=self.lease_s))
            )
            return bool(result.rowcount == 1)

    def _drive(self, tenant: str, rid: str) -> list[DesiredRecord]:
        publishes: list[DesiredRecord] = []
        with self.engine.begin() as conn:
            stmt = select(rollouts).where(rollouts.c.rollout_id == rid)
            if self.engine.dialect.name == "postgresql":
                stmt = stmt.with_for_update()
            row = conn.execute(stmt).first()
            if row is None:
                return []
            r = dict(row._mapping)
            if r["lease_owner"] != self.owner or r["state"] not in DRIVEN:
                return []  # another replica took over, or an operator changed it meanwhile
            self.drives += 1
            devs = [
                dict(d._mapping)
                for d in conn.execute(select(rollout_devices).where(rollout_devices.c.rollout_id == rid))
            ]
            if r["state"] == RolloutState.ROLLING_BACK:
                touched = [d for d in devs if d["state"] in TOUCHED_DEVICE_STATES]
                publishes += self._send_back(conn, tenant, rid, touched)
                self._update_rollout(
                    conn, rid, state=RolloutState.ROLLED_BACK, message=f"rolled back {len(touched)} device(s)"
                )
                return publishes
            publishes += self._advance_wave(conn, tenant, r, devs)
        return publishes

    def _advance_wave(
        self, conn: Connection, tenant: str, r: dict[str, Any], devs: list[dict[str, Any]]
    ) -> list[DesiredRecord]:
        rid, wave = r["rollout_id"], r["current_wave"]
        target = ModelRef.model_validate(r["model"])
        target_id = f"{target.name}:{target.version}"
        now = utcnow()
        members = [d for d in devs if d["wave"] == wave]
        fleet_now = {d.device_id: d for d in self.fleet.list_devices(tenant)}
        publishes: list[DesiredRecord] = []
        updating = sum(1 for d in members if d["state"] == "updating")
        for d in members:
            if d["state"] == "pending" and updating < r["max_concurrent"]:
                record = self.fleet.next_desired(
                    tenant,
                    d["device_id"],
                    model=target,
                    allow_downgrade=bool(r["allow_downgrade"]),
                    conn=conn,
                )
                publishes.append(record)
                self._update_device(
                    conn, rid, d, state="updating", started_at=now, desired_revision=record.revision
                )
                updating += 1
            elif d["state"] == "updating" and d["device_id"] in fleet_now:
                self._check_updating(conn, tenant, r, d, fleet_now[d["device_id"]], target_id, now, publishes)
            elif d["state"] == "active":
                self._check_health(conn, tenant, r, d, target_id, now)
        members = [
            dict(x._mapping)
            for x in conn.execute(
                select(rollout_devices).where(
                    and_(rollout_devices.c.rollout_id == rid, rollout_devices.c.wave == wave)
                )
            )
        ]
        if any(d["state"] in OPEN_DEVICE_STATES for d in members):
            return publishes
        answered = [d for d in members if d["state"] != "timed_out"]
        failed = [d for d in answered if d["state"] == "failed"]
        timed_out = len(members) - len(answered)
        if answered and len(failed) / len(answered) > r["failure_threshold"]:
            sent_back = [d for d in members if d["state"] in TOUCHED_DEVICE_STATES]
            publishes += self._send_back(conn, tenant, rid, sent_back)
            self._update_rollout(
                conn,
                rid,
                state=RolloutState.HALTED,
                message=(
                    f"wave {wave + 1}: {len(failed)} of {len(answered)} device(s) failed "
                    f"(threshold {r['failure_threshold']:.0%}); {len(sent_back)} sent back to their previous model"
                ),
            )
            log.warning("rollout %s halted in wave %d", rid, wave + 1)
        elif wave == len(r["waves"]) - 1:
            self._update_rollout(
                conn, rid, state=RolloutState.COMPLETED, message=_wave_note(wave, failed, timed_out)
            )
            log.info("rollout %s completed", rid)
        else:
            self._update_rollout(
                conn,
                rid,
                current_wave=wave + 1,
                wave_started_at=now,
                message=_wave_note(wave, failed, timed_out),
            )
        return publishes

    def _check_updating(
        self,
        conn: Connection,
        tenant: str,
        r: dict[str, Any],
        d: dict[str, Any],
        dev: Device,
        target_id: str,
        now: datetime,
        publishes: list[DesiredRecord],
    ) -> None:
        rev = d["desired_revision"]
        reported = dev.reported or {}
        if dev.phase == "active" and dev.active_model == target_id and dev.reported_revision >= rev:
            self._update_device(conn, r["rollout_id"], d, state="active", active_at=now)
        elif dev.phase == "failed" and reported.get("target_revision", -1) >= rev:
            err = reported.get("last_error") or {}
            self._update_device(
                conn, r["rollout_id"], d, state="failed", detail=f"{err.get('code')}: {err.get('message')}"
            )
        elif now - (as_utc(d["started_at"]) or now) > timedelta(seconds=r["wave_timeout_s"]):
            seen = dev.last_seen.isoformat() if dev.last_seen else "never"
            self._update_device(
                conn,
                r["rollout_id"],
                d,
                state="timed_out",
                detail=f"no update within {r['wave_timeout_s']:.0f}s ({dev.status}, last seen {seen})",
            )
        else:
            # The desired state is retained on the broker; re-publish now and then in case the
            # replica that recorded it died before publishing.
            key = (tenant, d["device_id"])
            last = self.last_publish.get(key)
            if last is None or now - last > timedelta(seconds=30):
                self.last_publish[key] = now
                current = self.fleet.current_desired(tenant, d["device_id"]) if last is not None else None
                if current is not None:
                    publishes.append(current)

    def _check_health(
        self,
        conn: Connection,
        tenant: str,
        r: dict[str, Any],
        d: dict[str, Any],
        target_id: str,
        now: datetime,
    ) -> None:
        active_at = as_utc(d["active_at"]) or now
        if now - active_at < timedelta(seconds=r["health_window_s"]):
            return
        n, errors, p50 = self.fleet.health(tenant, d["device_id"], target_id, active_at)
        if n < r["min_samples"]:
            # Too little traffic to judge: unknown, not healthy. The wave waits for more, up to
            # the wave timeout.
            if now - active_at > timedelta(seconds=r["wave_timeout_s"]):
                self._update_device(
                    conn,
                    r["rollout_id"],
                    d,
                    state="timed_out",
                    detail=f"only {n} request(s) of the {r['min_samples']} needed to judge its health",
                )
            return
        prev = d["previous_model"] or {}
        prev_id = f"{prev.get('name')}:{prev.get('version')}" if prev else None
        window = timedelta(seconds=max(r["health_window_s"], 60.0))
        started = as_utc(d["started_at"]) or now
        n0, errors0, p50_0 = (
            self.fleet.health(tenant, d["device_id"], prev_id, started - window) if prev_id else (0, 0, None)
        )
        rate = errors / n if n else 0.0
        rate0 = errors0 / n0 if n0 else 0.0
        if n and rate > r["max_error_rate"] and rate > rate0:
            self._update_device(
                conn, r["rollout_id"], d, state="failed", detail=f"error rate {rate:.1%} over {n} request(s)"
            )
        elif (
            p50 is not None
            and p50_0 is not None
            and n >= 5
            and n0 >= 5
            and p50 > r["max_latency_ratio"] * p50_0
        ):
            self._update_device(
                conn,
                r["rollout_id"],
                d,
                state="failed",
                detail=f"median latency {p50:.0f} ms vs {p50_0:.0f} ms before",
            )
        else:
            self._update_device(
                conn, r["rollout_id"], d, state="healthy", detail=f"{n} request(s), error rate {rate:.1%}"
            )

    def _send_back(
        self, conn: Connection, tenant: str, rid: str, devs: list[dict[str, Any]]
    ) -> list[DesiredRecord]:
        out = []
        for d in devs:
            previous = ModelRef.model_validate(d["previous_model"]) if d["previous_model"] else None
            # Signed as a rollback: devices install a lower release only when told it is one.
            record = self.fleet.next_desired(
                tenant, d["device_id"], model=previous, allow_downgrade=True, conn=conn
            )
            out.append(record)
            self._update_device(conn, rid, d, state="rolled_back", desired_revision=record.revision)
        return out

    def _update_device(self, conn: Connection, rid: str, d: dict[str, Any], **values: Any) -> None:
        conn.execute(
            update(rollout_devices)
            .where(and_(rollout_devices.c.rollout_id == rid, rollout_devices.c.device_id == d["device_id"]))
            .values(**values)
        )
        d.update(values)

    def _update_rollout(self, conn: Connection, rid: str, **values: Any) -> None:
        if "state" in values:
            values["state"] = RolloutState(values["state"]).value
        conn.execute(
            update(rollouts).where(rollouts.c.rollout_id == rid).values(updated_at=utcnow(), **values)
        )


def _wave_note(wave: int, failed: list[dict[str, Any]], timed_out: int) -> str:
    note = f"wave {wave + 1} done"
    if failed:
        note += f"; {len(failed)} failed (under the threshold)"
    if timed_out:
        note += f"; {timed_out} timed out (offline or stuck), skipped"
    return note
