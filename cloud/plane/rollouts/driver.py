"""The rollout driver: each tick, on the replica holding a rollout's lease, moves its current
wave along (see the package docstring), and returns the desired states to publish."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine, Text, and_, bindparam, cast, or_, select, update

from cloud.plane.fleet import DesiredRecord, DeviceProgress, Fleet
from cloud.plane.rollouts.spec import (
    DEVICE_TRANSITIONS,
    DRIVEN,
    OPEN_DEVICE_STATES,
    TOUCHED_DEVICE_STATES,
    ConcurrentDrive,
    DeviceRow,
    DeviceState,
    IllegalTransition,
    RolloutRow,
    RolloutState,
)
from cloud.plane.store import rollout_devices, rollouts, utcnow

log = logging.getLogger(__name__)

# A device still updating this long after its desired state was last published gets it again.
REPUBLISH_AFTER = timedelta(seconds=30)


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
    # Health windows and wave timeouts are judged on this clock (tests pass a fake one).
    clock: Callable[[], datetime] = utcnow
    # Device-row changes of the rollout being driven, written together (``_flush``).
    _writes: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    _rows_written: int = 0
    # The driven rollout's state as this drive read or last wrote it: its writes to the rollout
    # row are compared and set on it, so that an operator's action committed meanwhile wins.
    _state: str = ""
    # Each rollout's device rows as this driver last committed them, by rollout id: only the
    # driver writes them after creation, so while the rollout's ``devices_version`` is the one
    # committed with them, a tick need not read 10,000 rows again (another replica that drove
    # meanwhile moved the version).
    _known: dict[str, tuple[int, list[DeviceRow]]] = field(default_factory=dict)
    _pruned_at: datetime | None = None

    def tick(self) -> list[DesiredRecord]:
        out: list[DesiredRecord] = []
        with self.engine.connect() as conn:
            ids = conn.execute(
                select(rollouts.c.rollout_id, rollouts.c.tenant).where(
                    rollouts.c.state.in_([s.value for s in DRIVEN])
                )
            ).all()
        for gone in self._known.keys() - {rid for rid, _ in ids}:
            del self._known[gone]  # finished, or driven no more
        self._forget_old_publishes()
        for rid, tenant in ids:
            out.extend(self._drive_isolated(tenant, rid))
        return out

    def _forget_old_publishes(self) -> None:
        """Drop what ``last_publish`` holds of devices no longer re-published (their rollout
        ended, was aborted, or is driven by another replica), at most once per interval."""
        now = self.clock()
        if self._pruned_at is not None and now - self._pruned_at < REPUBLISH_AFTER:
            return
        self._pruned_at = now
        stale = now - 10 * REPUBLISH_AFTER
        self.last_publish = {k: at for k, at in self.last_publish.items() if at > stale}

    def _drive_isolated(self, tenant: str, rid: str) -> list[DesiredRecord]:
        """One rollout's step; its failure is logged and counted, and the other rollouts (of every
        tenant) are still driven in this tick."""
        try:
            return self._drive(tenant, rid) if self._lease(rid) else []
        except ConcurrentDrive as exc:
            log.warning("%s; its changes were rolled back", exc)
            return []
        except Exception:
            self.failures += 1
            log.exception("driving rollout %s of tenant %s failed; the other rollouts go on", rid, tenant)
            return []

    def _lease(self, rid: str) -> bool:
        """Renew this replica's lease on the rollout, or take it (free, or expired). A lease taken
        rather than renewed drops the rows this driver kept: whoever drove meanwhile may have
        changed them (a replica of a release before ``devices_version`` would not have said so)."""
        now = self.clock()
        until = now + timedelta(seconds=self.lease_s)
        driven = and_(rollouts.c.rollout_id == rid, rollouts.c.state.in_([s.value for s in DRIVEN]))
        with self.engine.begin() as conn:
            renewed = conn.execute(
                update(rollouts)
                .where(and_(driven, rollouts.c.lease_owner == self.owner, rollouts.c.lease_until >= now))
                .values(lease_until=until)
            ).rowcount
            if renewed == 1:
                return True
            self._known.pop(rid, None)
            taken = conn.execute(
                update(rollouts)
                .where(
                    and_(
                        driven,
                        or_(
                            rollouts.c.lease_owner.is_(None),
                            rollouts.c.lease_owner == self.owner,
                            rollouts.c.lease_until < now,
                        ),
                    )
                )
                .values(lease_owner=self.owner, lease_until=until)
            ).rowcount
            return bool(taken == 1)

    def _drive(self, tenant: str, rid: str) -> list[DesiredRecord]:
        # Changes a failed drive collected were rolled back with its transaction: never write
        # them, nor trust rows they were applied to (taken out of ``_known`` until committed).
        self._writes.clear()
        self._rows_written = 0
        self._state = ""
        known = self._known.pop(rid, None)
        with self.engine.begin() as conn:
            stmt = select(rollouts).where(rollouts.c.rollout_id == rid)
            if self.engine.dialect.name == "postgresql":
                stmt = stmt.with_for_update()
            row = conn.execute(stmt).first()
            if row is None:
                return []
            r = RolloutRow.from_row(row._mapping)
            if r.lease_owner != self.owner or r.state not in DRIVEN:
                return []  # another replica took over, or an operator changed it meanwhile
            self._state = RolloutState(r.state).value
            self.drives += 1
            devs = (
                known[1] if known is not None and known[0] == r.devices_version else _device_rows(conn, rid)
            )
            if r.state == RolloutState.ROLLING_BACK:
                touched = [d for d in devs if d.state in TOUCHED_DEVICE_STATES]
                publishes = self._send_back(conn, tenant, rid, touched)
                self._flush(conn)
                self._update_rollout(
                    conn, rid, state=RolloutState.ROLLED_BACK, message=f"rolled back {len(touched)} device(s)"
                )
            else:
                publishes = self._advance_wave(conn, tenant, r, devs)
            version = r.devices_version
            if self._rows_written:
                # Compare and set: on SQLite the reads above saw no stable snapshot, so a replica
                # that drove meanwhile (its lease ran out under a long tick) makes this drive roll
                # back instead of committing changes made to rows it had not seen.
                version += 1
                # The state too: an operator's pause, abort or rollback committed during the tick
                # (SQLite again) must not be followed by this tick's devices and desired states.
                moved = conn.execute(
                    update(rollouts)
                    .where(
                        and_(
                            rollouts.c.rollout_id == rid,
                            rollouts.c.devices_version == r.devices_version,
                            rollouts.c.state == self._state,
                        )
                    )
                    .values(devices_version=version)
                ).rowcount
                if moved != 1:
                    raise ConcurrentDrive(
                        f"rollout {rid} was driven by another replica, or changed by an operator, during this tick"
                    )
        self._known[rid] = (version, devs)
        return publishes

    def _advance_wave(
        self, conn: Connection, tenant: str, r: RolloutRow, devs: list[DeviceRow]
    ) -> list[DesiredRecord]:
        rid, wave = r.rollout_id, r.current_wave
        target = r.model
        target_id = f"{target.name}:{target.version}"
        now = self.clock()
        members = [d for d in devs if d.wave == wave]
        updating = [d for d in members if d.state == DeviceState.UPDATING]
        active = [d for d in members if d.state == DeviceState.ACTIVE]
        # Read only when some device is updating, and only what checking it takes: the devices
        # whose update ended, and those past the wave timeout.
        timeout = timedelta(seconds=r.wave_timeout_s)
        overdue = {d.device_id for d in updating if now - (d.started_at or now) > timeout}
        fleet_now = (
            self.fleet.progress(tenant, [d.device_id for d in updating], target_id, overdue=overdue)
            if updating
            else {}
        )
        publishes: list[DesiredRecord] = []
        health = self._wave_health(tenant, r, members, target_id, now)
        pending = [d for d in members if d.state == DeviceState.PENDING]
        starting = pending[: max(0, r.max_concurrent - len(updating))]
        records = self.fleet.next_desired_many(
            tenant,
            [d.device_id for d in starting],
            model=target,
            allow_downgrade=bool(r.allow_downgrade),
            conn=conn,
        )
        for d, record in zip(starting, records, strict=True):
            publishes.append(record)
            self._update_device(
                conn, rid, d, state=DeviceState.UPDATING, started_at=now, desired_revision=record.revision
            )
        for d in updating:
            dev, late = fleet_now.get(d.device_id), d.device_id in overdue
            if dev is None and not late:
                self._republish_now_and_then(tenant, d, now, publishes)  # still on its way
            else:
                self._check_updating(conn, tenant, r, d, dev, late, target_id, now, publishes)
        for d in active:
            self._check_health(conn, r, d, target_id, now, health)
        self._flush(conn)
        # ``members`` are as just written: _update_device changes each row with its write.
        if any(d.state in OPEN_DEVICE_STATES for d in members):
            return publishes
        answered = [d for d in members if d.state != DeviceState.TIMED_OUT]
        failed = [d for d in answered if d.state == DeviceState.FAILED]
        timed_out = len(members) - len(answered)
        if answered and len(failed) / len(answered) > r.failure_threshold:
            sent_back = [d for d in members if d.state in TOUCHED_DEVICE_STATES]
            publishes += self._send_back(conn, tenant, rid, sent_back)
            self._update_rollout(
                conn,
                rid,
                state=RolloutState.HALTED,
                message=(
                    f"wave {wave + 1}: {len(failed)} of {len(answered)} device(s) failed "
                    f"(threshold {r.failure_threshold:.0%}); {len(sent_back)} sent back to their previous model"
                ),
            )
            log.warning("rollout %s halted in wave %d", rid, wave + 1)
        else:
            # Under the threshold the rollout goes on, but a device that failed its quality or
            # health gate is serving the target badly: it goes back (one that failed to install
            # still runs its previous model, and is told to stay there).
            publishes += self._send_back(conn, tenant, rid, failed)
            if wave == len(r.waves) - 1:
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
        self._flush(conn)
        return publishes

    def _check_updating(
        self,
        conn: Connection,
        tenant: str,
        r: RolloutRow,
        d: DeviceRow,
        dev: DeviceProgress | None,
        overdue: bool,
        target_id: str,
        now: datetime,
        publishes: list[DesiredRecord],
    ) -> None:
        """A device whose update ended, or whose wave timeout passed (``overdue``; ``dev`` is
        None when it is no longer in the fleet)."""
        rev = d.desired_revision
        outcome = (dev.outcome if dev is not None else None) or {}
        key = (tenant, d.device_id)
        if (
            dev is not None
            and dev.phase == "active"
            and dev.active_model == target_id
            and dev.reported_revision >= rev
        ):
            failed_quality = _quality_verdict(outcome.get("evaluation"), target_id, r.max_eval_drop)
            if failed_quality is not None:
                self._update_device(conn, r.rollout_id, d, state=DeviceState.FAILED, detail=failed_quality)
            else:
                self._update_device(conn, r.rollout_id, d, state=DeviceState.ACTIVE, active_at=now)
        elif dev is not None and dev.phase == "failed" and outcome.get("target_revision", -1) >= rev:
            err = outcome.get("last_error") or {}
            self._update_device(
                conn,
                r.rollout_id,
                d,
                state=DeviceState.FAILED,
                detail=f"{err.get('code')}: {err.get('message')}",
            )
        elif overdue:
            if dev is None:
                how = "no longer in the fleet"
            else:
                how = f"{dev.status}, last seen {dev.last_seen.isoformat() if dev.last_seen else 'never'}"
            self._update_device(
                conn,
                r.rollout_id,
                d,
                state=DeviceState.TIMED_OUT,
                detail=f"no update within {r.wave_timeout_s:.0f}s ({how})",
            )
        else:
            self._republish_now_and_then(tenant, d, now, publishes)
            return
        self.last_publish.pop(key, None)  # its update ended: nothing more to re-publish

    def _republish_now_and_then(
        self, tenant: str, d: DeviceRow, now: datetime, publishes: list[DesiredRecord]
    ) -> None:
        """The desired state is retained on the broker; publish it again now and then in case
        the replica that recorded it died before publishing."""
        key = (tenant, d.device_id)
        last = self.last_publish.get(key)
        if last is None or now - last > REPUBLISH_AFTER:
            self.last_publish[key] = now
            current = self.fleet.current_desired(tenant, d.device_id) if last is not None else None
            if current is not None:
                publishes.append(current)

    @staticmethod
    def _health_asks(
        r: RolloutRow, d: DeviceRow, target_id: str, now: datetime
    ) -> list[tuple[str, str, datetime]]:
        """What judging ``d`` needs: its traffic on the target since activation, and on its
        previous model before the update began (the baseline); none while its window is open."""
        active_at = d.active_at or now
        if d.state != DeviceState.ACTIVE or now - active_at < timedelta(seconds=r.health_window_s):
            return []
        asks = [(d.device_id, target_id, active_at)]
        prev = d.previous_model
        if prev is not None:
            window = timedelta(seconds=max(r.health_window_s, 60.0))
            started = d.started_at or now
            asks.append((d.device_id, f"{prev.name}:{prev.version}", started - window))
        return asks

    def _wave_health(
        self, tenant: str, r: RolloutRow, members: list[DeviceRow], target_id: str, now: datetime
    ) -> dict[tuple[str, str, datetime], tuple[int, int, float | None]]:
        """Every health figure this tick needs for the wave, read in one query."""
        asks = [a for d in members for a in self._health_asks(r, d, target_id, now)]
        return dict(zip(asks, self.fleet.health_many(tenant, asks), strict=True))

    def _check_health(
        self,
        conn: Connection,
        r: RolloutRow,
        d: DeviceRow,
        target_id: str,
        now: datetime,
        health: dict[tuple[str, str, datetime], tuple[int, int, float | None]],
    ) -> None:
        asks = self._health_asks(r, d, target_id, now)
        if not asks:
            return  # the health window is still open
        active_at = asks[0][2]
        n, errors, p50 = health[asks[0]]
        if n < r.min_samples:
            # Too little traffic to judge: unknown, not healthy. The wave waits for more, up to
            # the wave timeout.
            if now - active_at > timedelta(seconds=r.wave_timeout_s):
                self._update_device(
                    conn,
                    r.rollout_id,
                    d,
                    state=DeviceState.TIMED_OUT,
                    detail=f"only {n} request(s) of the {r.min_samples} needed to judge its health",
                )
            return
        n0, errors0, p50_0 = health[asks[1]] if len(asks) > 1 else (0, 0, None)
        rate = errors / n if n else 0.0
        rate0 = errors0 / n0 if n0 else 0.0
        if n and rate > r.max_error_rate and rate > rate0:
            self._update_device(
                conn,
                r.rollout_id,
                d,
                state=DeviceState.FAILED,
                detail=f"error rate {rate:.1%} over {n} request(s)",
            )
        elif (
            p50 is not None and p50_0 is not None and n >= 5 and n0 >= 5 and p50 > r.max_latency_ratio * p50_0
        ):
            self._update_device(
                conn,
                r.rollout_id,
                d,
                state=DeviceState.FAILED,
                detail=f"median latency {p50:.0f} ms vs {p50_0:.0f} ms before",
            )
        else:
            self._update_device(
                conn,
                r.rollout_id,
                d,
                state=DeviceState.HEALTHY,
                detail=f"{n} request(s), error rate {rate:.1%}",
            )

    def _send_back(
        self, conn: Connection, tenant: str, rid: str, devs: list[DeviceRow]
    ) -> list[DesiredRecord]:
        out = []
        for d in devs:
            previous = d.previous_model
            # Signed as a rollback: devices install a lower release only when told it is one.
            record = self.fleet.next_desired(
                tenant, d.device_id, model=previous, allow_downgrade=True, conn=conn
            )
            out.append(record)
            self._update_device(conn, rid, d, state=DeviceState.ROLLED_BACK, desired_revision=record.revision)
        return out

    def _update_device(self, conn: Connection, rid: str, d: DeviceRow, **values: Any) -> None:
        """Change a device's row (checked against the state machine now, written by ``_flush``:
        a tick that moves 10,000 devices runs one statement per kind of change, not 10,000)."""
        if "state" in values:
            to = DeviceState(values["state"])
            if to not in DEVICE_TRANSITIONS[d.state]:
                raise IllegalTransition(f"device {d.device_id} of rollout {rid}: {d.state} → {to}")
            values["state"] = to
        self._writes.append(
            (rid, d.device_id, {k: (v.value if isinstance(v, DeviceState) else v) for k, v in values.items()})
        )
        for name, value in values.items():
            setattr(d, name, value)

    def _flush(self, conn: Connection) -> None:
        """Write the changes ``_update_device`` collected, grouped by the columns they set."""
        merged: dict[tuple[str, str], dict[str, Any]] = {}
        for rid, device_id, values in self._writes:  # a later change of a column wins
            merged.setdefault((rid, device_id), {}).update(values)
        self._writes.clear()
        self._rows_written += len(merged)
        groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for (rid, device_id), values in merged.items():
            row = {"b_rollout": rid, "b_device": device_id, **{f"b_{k}": v for k, v in values.items()}}
            groups.setdefault(tuple(sorted(values)), []).append(row)
        for columns, params in groups.items():
            conn.execute(
                update(rollout_devices)
                .where(
                    and_(
                        rollout_devices.c.rollout_id == bindparam("b_rollout"),
                        rollout_devices.c.device_id == bindparam("b_device"),
                    )
                )
                .values({c: bindparam(f"b_{c}") for c in columns}),
                params,
            )

    def _update_rollout(self, conn: Connection, rid: str, **values: Any) -> None:
        """Set the rollout's columns, provided its state is still the one this drive read (or
        last wrote): an operator's action committed meanwhile wins, and this tick rolls back."""
        if "state" in values:
            values["state"] = RolloutState(values["state"]).value
        moved = conn.execute(
            update(rollouts)
            .where(and_(rollouts.c.rollout_id == rid, rollouts.c.state == self._state))
            .values(updated_at=self.clock(), **values)
        ).rowcount
        if moved != 1:
            raise ConcurrentDrive(f"rollout {rid} was changed by an operator during this tick")
        self._state = values.get("state", self._state)


def _quality_verdict(evaluation: Any, target_id: str, max_drop: float) -> str | None:
    """Why a device's evaluation of the target fails the quality gate; None when it passes (or
    the package carries no evaluation set). A fast model that answers wrongly fails here, in its
    first wave, before any traffic could show it."""
    if not isinstance(evaluation, dict) or evaluation.get("model") != target_id:
        return None
    try:
        agreement, expected = float(evaluation["agreement"]), float(evaluation["expected"])
    except (KeyError, TypeError, ValueError):
        return None
    if agreement >= expected - max_drop:
        return None
    return (
        f"quality gate: {agreement:.1%} of the evaluation set's {evaluation.get('tokens')} reference tokens "
        f"agree (answers by {evaluation.get('reference')}), the packager measured {expected:.1%}; "
        f"at most {max_drop:.1%} lower is allowed"
    )


def _wave_note(wave: int, failed: list[DeviceRow], timed_out: int) -> str:
    note = f"wave {wave + 1} done"
    if failed:
        note += f"; {len(failed)} failed (under the threshold) and sent back to their previous model"
    if timed_out:
        note += f"; {timed_out} timed out (offline or stuck), skipped"
    return note


def _device_rows(conn: Connection, rid: str) -> list[DeviceRow]:
    """Every device row of rollout ``rid``, read as plain columns (the previous model as its JSON
    text, parsed once per distinct model): a tick of a 10,000-device wave reads them all."""
    c = rollout_devices.c
    rows = conn.execute(
        select(
            c.device_id,
            c.wave,
            c.state,
            cast(c.previous_model, Text),
            c.desired_revision,
            c.started_at,
            c.active_at,
            c.detail,
        ).where(c.rollout_id == rid)
    )
    return [DeviceRow.from_values(*row) for row in rows]
