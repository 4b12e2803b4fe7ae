"""Desired states have one writer: ``Fleet.next_desired`` records each under its device's revision
counter (in the database, inside the caller's transaction), and only then is it signed with the
control key and published retained on the device's ``desired`` topic.

Rollouts (the driver), config pushes (REST) and ``autoglm cloud assign`` all go this way: the
running control plane publishes through its own MQTT session (``ControlPlane.publish``);
``assign`` publishes through a short one of its own, so it works with no control plane running.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass

import aiomqtt
from sqlalchemy import Connection

from cloud.paths import CloudPaths
from cloud.plane.fleet import DesiredRecord, Fleet
from cloud.plane.rollouts.actions import Rollouts
from cloud.plane.store import make_engine, migrate
from cloud.registry import ModelRegistry
from cloud.settings import CloudSettings
from shared.control import ControlSigner
from shared.errors import BrokerError, Conflict, ContractError, NotFound
from shared.ids import is_valid_name
from shared.messages import DesiredState
from shared.mqtt import QOS, make_client
from shared.signing import SigningKey
from shared.topics import Topics

log = logging.getLogger(__name__)

# A retained presence comes with the subscription's acknowledgement; the wait is for an agent
# started a moment before (`edge run … &` and then `cloud assign`, as the README's lab path does),
# whose presence arrives when it connects.
PRESENCE_WAIT_S = 10.0


def control_signer(settings: CloudSettings) -> ControlSigner:
    """The control key of ``settings`` with its TTLs: ``control.key_file``, which must exist, or
    the default one under $AUTOGLM_HOME (created on first use)."""
    control = settings.control
    if control.key_file is not None:
        # A path the operator named must hold the key: a Secret not mounted, or a typo, would
        # otherwise give each replica a key of its own, and devices would refuse them all.
        return ControlSigner(SigningKey.load(control.key_file), control.desired_ttl_s, control.command_ttl_s)
    key_path = CloudPaths.from_env().control_key
    key, created = SigningKey.load_or_create(key_path)
    if created:
        log.warning(
            "created the control key %s at %s; pin it in every edge config", key.public.key_id, key_path
        )
    return ControlSigner(key, control.desired_ttl_s, control.command_ttl_s)


@dataclass(frozen=True)
class Assigned:
    record: DesiredRecord
    signed: DesiredState


async def assign(
    settings: CloudSettings,
    tenant: str,
    device_id: str,
    name: str,
    version: str,
    *,
    allow_downgrade: bool,
    new: bool = False,
) -> Assigned:
    """Point one device at a packaged model: the next revision from the database, signed and
    published retained. The device's pushed config is kept.

    The device must be known, to the control plane's database or by its presence on the broker
    (a lab without a control plane records none), unless ``new``: a mistyped id otherwise became
    a device that never reports, listed forever and counted in every rollout after. A device in a
    rollout that is not finished is refused: the driver would judge it on the model it sent, and a
    rollback of the rollout would undo this."""
    if tenant not in settings.tenants:
        raise NotFound(f"tenant {tenant!r} is not in the config's tenants", tenant=tenant)
    if not is_valid_name(device_id):
        raise ContractError("a device id is a name: letters, digits, '.', '_', '-'", device_id=device_id)
    entry = ModelRegistry(settings.registry_dir / tenant).get(name, version)
    topics = Topics(tenant)
    engine = make_engine(settings.database_url)
    try:
        migrate(engine)
        fleet = Fleet(engine)
        with engine.connect() as conn:
            known = fleet.exists(tenant, device_id, conn=conn)
            _refuse_busy(conn, tenant, device_id)
        if not known and not new and not await _present(settings, topics, device_id):
            raise NotFound(
                "no such device: the control plane has not recorded it and the broker holds no presence "
                "of it; --new assigns a model to a device before its first connection",
                device_id=device_id,
            )
        with engine.begin() as conn:
            # Again in the transaction that records it: a rollout created while the broker was
            # asked must not be overridden either.
            _refuse_busy(conn, tenant, device_id)
            record = fleet.next_desired(
                tenant, device_id, model=entry.ref, config=None, allow_downgrade=allow_downgrade, conn=conn
            )
    finally:
        engine.dispose()
    signed, payload = control_signer(settings).desired_wire(
        record.message(), device_id=device_id, tenant=tenant
    )
    try:
        async with make_client(settings.broker, _client_id(), persistent=False) as client:
            await client.publish(topics.desired(device_id), payload, qos=QOS, retain=True)
    except aiomqtt.MqttError as exc:
        raise BrokerError(
            f"revision {record.revision} is recorded but could not be published ({exc}); "
            "run the command again once the broker is reachable",
            broker=f"{settings.broker.host}:{settings.broker.port}",
        ) from exc
    return Assigned(record, signed)


def _refuse_busy(conn: Connection, tenant: str, device_id: str) -> None:
    busy = Rollouts.in_unfinished_rollouts(conn, tenant, [device_id])
    if busy:
        raise Conflict(
            f"the device is in rollout {busy[0][0]}, which is not finished; finish, abort or roll it "
            "back first",
            device_id=device_id,
        )


def _client_id() -> str:
    # A client id of its own: a replica's id would take over (and end) that replica's session.
    return f"autoglm-assign-{uuid.uuid4().hex[:12]}"


async def _present(settings: CloudSettings, topics: Topics, device_id: str) -> bool:
    """Whether the broker holds the device's retained presence (every agent publishes one when it
    connects, and its Last Will when it leaves): it has connected, with or without a control plane."""
    try:
        async with make_client(settings.broker, _client_id(), persistent=False) as client:
            await client.subscribe(topics.status(device_id), qos=QOS)
            async with asyncio.timeout(PRESENCE_WAIT_S):
                async for message in client.messages:
                    if message.payload:
                        return True
    except TimeoutError:
        return False
    except aiomqtt.MqttError as exc:
        raise BrokerError(
            f"cannot ask the broker whether the device has connected ({exc}); nothing was recorded",
            broker=f"{settings.broker.host}:{settings.broker.port}",
        ) from exc
    return False
