"""What operators do with rollouts (create, pause, resume, abort, rollback) and how the REST API
shows them. The driver (``driver.py``) moves them along."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, Engine, and_, func, select, update

from cloud.plane.fleet import Fleet, Selector, in_chunks
from cloud.plane.rollouts.spec import (
    IN_USE,
    TOUCHED_DEVICE_STATES,
    DeviceState,
    RolloutSpec,
    RolloutState,
    assign_waves,
)
from cloud.plane.store import as_utc, rollout_devices, rollouts, utcnow
from shared.errors import Conflict, ContractError, NotFound
from shared.ids import is_valid_name

log = logging.getLogger(__name__)


# Whether the tenant's registry still holds name:version (a rollback sends devices back to it).
InRegistry = Callable[[str, str, str], bool]


class Rollouts:
    def __init__(self, engine: Engine, fleet: Fleet, in_registry: InRegistry | None = None) -> None:
        self.engine = engine
        self.fleet = fleet
        self.in_registry = in_registry

    # -- operator actions -------------------------------------------------------------------------
    def create(self, tenant: str, spec: RolloutSpec) -> dict[str, Any]:
        spec.validate()
        selector = Selector.parse(spec.selector)
        targets = self.fleet.rollout_targets(tenant, selector)
        if not targets:
            raise ContractError(f"no device matches the selector {spec.selector!r}", selector=spec.selector)
        waves = assign_waves(list(targets), spec.waves)
        rid = uuid.uuid4().hex[:12]
        now = utcnow()
        with self.engine.begin() as conn:
            busy = self.in_unfinished_rollouts(conn, tenant, list(targets))
            if busy:
                # Two drivers would tell the same devices two models, each judging the other's
                # answers (one rollout "completed" with every device timed out on the other's
                # model), and a rollback of one would undo the other.
                rollouts_named = ", ".join(sorted({r for r, _ in busy}))
                raise Conflict(
                    f"{len(busy)} of the {len(targets)} device(s) the selector matches are in a rollout "
                    f"that is not finished ({rollouts_named}); finish, abort or roll it back first, or "
                    "narrow the selector",
                    selector=spec.selector,
                )
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
                    max_eval_drop=spec.max_eval_drop,
                    state=RolloutState.RUNNING.value,
                    current_wave=0,
                    wave_started_at=now,
                    message="",
                    created_at=now,
                    updated_at=now,
                )
            )
            if targets:
                conn.execute(
                    rollout_devices.insert(),
                    [
                        {
                            "rollout_id": rid,
                            "device_id": device_id,
                            "wave": waves[device_id],
                            "previous_model": previous,
                            "desired_revision": 0,
                            "state": DeviceState.PENDING.value,
                            "detail": "",
                        }
                        for device_id, previous in targets.items()
                    ],
                )
        log.info(
            "rollout %s: %s to %d device(s) in %d wave(s)",
            rid,
            spec.model.name,
            len(targets),
            len(spec.waves),
        )
        return self.show(tenant, rid)

    @staticmethod
    def in_unfinished_rollouts(conn: Connection, tenant: str, device_ids: list[str]) -> list[tuple[str, str]]:
        """(rollout, device) of ``device_ids`` in the tenant's rollouts still running, paused or
        rolling back."""
        found: list[tuple[str, str]] = []
        active = [s.value for s in IN_USE]
        for chunk in in_chunks(device_ids):
            found += conn.execute(
                select(rollout_devices.c.rollout_id, rollout_devices.c.device_id)
                .join(rollouts, rollouts.c.rollout_id == rollout_devices.c.rollout_id)
                .where(
                    and_(
                        rollouts.c.tenant == tenant,
                        rollouts.c.state.in_(active),
                        rollout_devices.c.device_id.in_(chunk),
                    )
                )
            ).all()
        return [(r, d) for r, d in found]

    def _row(self, conn: Connection, tenant: str, rid: str, lock: bool = False) -> Any:
        if not is_valid_name(rid):
            # No rollout has such an id (PostgreSQL refuses a NUL in a query's text: a 500).
            raise NotFound("no such rollout", rollout_id=rid)
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
                # The request is well formed; the rollout's state refuses it (409, as a race does).
                raise Conflict(
                    f"rollout is {row['state']}; this needs one of {', '.join(allowed)}", rollout_id=rid
                )
            # Compare and set on the state just read: SQLite takes no row lock for the read, and
            # of two actions at once (an abort and a rollback) both were acknowledged while the
            # later write undid the earlier (a rollback answered "rolling_back", then aborted).
            moved = conn.execute(
                update(rollouts)
                .where(and_(rollouts.c.rollout_id == rid, rollouts.c.state == row["state"]))
                .values(state=to.value, message=msg, updated_at=utcnow())
            ).rowcount
            if moved != 1:
                now = self._row(conn, tenant, rid)["state"]
                raise Conflict(
                    f"rollout changed to {now} while this action ran (another action, or its driver); "
                    "look at it again and retry if it still applies",
                    rollout_id=rid,
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
        """Send every device this rollout touched back to its previous model (done by the driver).
        Refused (409) when one of those models has since been deleted from the registry: the
        devices would be told to fetch a package that is gone, and fail."""
        gone = self._previous_models_gone(tenant, rid)
        if gone:
            raise Conflict(
                f"rolling back would send devices to {', '.join(sorted(gone))}, no longer in the registry; "
                "roll out a version the registry has instead",
                rollout_id=rid,
            )
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

    def _previous_models_gone(self, tenant: str, rid: str) -> set[str]:
        if self.in_registry is None:
            return set()
        with self.engine.connect() as conn:
            self._row(conn, tenant, rid)
            previous = conn.execute(
                select(rollout_devices.c.previous_model).where(
                    and_(
                        rollout_devices.c.rollout_id == rid,
                        rollout_devices.c.state.in_([s.value for s in TOUCHED_DEVICE_STATES]),
                    )
                )
            ).scalars()  # no DISTINCT: PostgreSQL's json type has no equality
            models = {(m["name"], m["version"]) for m in previous if m}
        return {f"{n}:{v}" for n, v in models if not self.in_registry(tenant, n, v)}

    def models_in_use(self, tenant: str) -> dict[tuple[str, str], list[str]]:
        """(name, version) -> the rollouts that use it now, for every model in use, in one query."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(rollouts.c.rollout_id, rollouts.c.model).where(
                    and_(rollouts.c.tenant == tenant, rollouts.c.state.in_([s.value for s in IN_USE]))
                )
            ).all()
        out: dict[tuple[str, str], list[str]] = {}
        for rid, model in rows:
            out.setdefault((model.get("name"), model.get("version")), []).append(rid)
        return out

    def in_use(self, tenant: str, name: str, version: str) -> list[str]:
        return self.models_in_use(tenant).get((name, version), [])

    # -- views ----------------------------------------------------------------------------------------
    def list(self, tenant: str, devices: bool = True) -> list[dict[str, Any]]:
        """Every rollout of ``tenant``, oldest first: two queries, however many there are.
        ``devices=False`` leaves out the per-device lists (the wave counts stay, counted in the
        database): ten finished rollouts of 10,000 devices are 100,000 rows otherwise."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(rollouts).where(rollouts.c.tenant == tenant).order_by(rollouts.c.created_at)
            ).all()
            ids = [r._mapping["rollout_id"] for r in rows]
            if not devices:
                counts: dict[str, dict[int, dict[str, int]]] = {}
                for chunk in in_chunks(ids):
                    for rid, wave, state, n in conn.execute(
                        select(
                            rollout_devices.c.rollout_id,
                            rollout_devices.c.wave,
                            rollout_devices.c.state,
                            func.count(),
                        )
                        .where(rollout_devices.c.rollout_id.in_(chunk))
                        .group_by(
                            rollout_devices.c.rollout_id, rollout_devices.c.wave, rollout_devices.c.state
                        )
                    ):
                        counts.setdefault(rid, {}).setdefault(wave, {})[state] = n
                return [_view(r._mapping, [], counts.get(r._mapping["rollout_id"], {})) for r in rows]
            devs = conn.execute(
                select(rollout_devices)
                .where(rollout_devices.c.rollout_id.in_(ids))
                .order_by(rollout_devices.c.device_id)
            ).all()
        by_rollout: dict[str, list[Any]] = {}
        for d in devs:
            by_rollout.setdefault(d._mapping["rollout_id"], []).append(d._mapping)
        return [_view(r._mapping, by_rollout.get(r._mapping["rollout_id"], [])) for r in rows]

    def show(self, tenant: str, rid: str, devices: bool = True) -> dict[str, Any]:
        """The rollout; ``devices=False`` leaves out the per-device list (the wave counts stay):
        what a dashboard polling a 10,000-device rollout needs, counted in the database."""
        with self.engine.connect() as conn:
            row = self._row(conn, tenant, rid)
            if not devices:
                counted = conn.execute(
                    select(rollout_devices.c.wave, rollout_devices.c.state, func.count())
                    .where(rollout_devices.c.rollout_id == rid)
                    .group_by(rollout_devices.c.wave, rollout_devices.c.state)
                ).all()
                counts: dict[int, dict[str, int]] = {}
                for wave, state, n in counted:
                    counts.setdefault(wave, {})[state] = n
                return _view(row, [], counts)
            devs = conn.execute(
                select(rollout_devices)
                .where(rollout_devices.c.rollout_id == rid)
                .order_by(rollout_devices.c.device_id)
            ).all()
        return _view(row, [d._mapping for d in devs])


def _view(row: Any, devs: list[Any], counted: dict[int, dict[str, int]] | None = None) -> dict[str, Any]:
    """A rollout as the REST API shows it (cloud/plane/views.py RolloutView); wave counts from
    ``devs``, or ``counted`` (wave → state → devices) when the list is left out."""
    waves = []
    for i, pct in enumerate(row["waves"]):
        if counted is not None:
            counts = counted.get(i, {})
        else:
            counts = {}
            for m in devs:
                if m["wave"] == i:
                    counts[m["state"]] = counts.get(m["state"], 0) + 1
        waves.append({"index": i, "percent": pct, "devices": sum(counts.values()), "states": counts})
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
        "max_eval_drop": row["max_eval_drop"],
        "created_at": as_utc(row["created_at"]).isoformat(),  # type: ignore[union-attr]
        "updated_at": as_utc(row["updated_at"]).isoformat(),  # type: ignore[union-attr]
        "driver": row["lease_owner"],
        "waves": waves,
        "devices": [
            {"device_id": d["device_id"], "wave": d["wave"], "state": d["state"], "detail": d["detail"]}
            for d in devs
        ],
    }
