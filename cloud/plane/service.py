"""The control-plane service: database, MQTT links per tenant, the rollout driver, the REST API,
and the fallback gateway in front of the pool.

The FastAPI lifespan owns every long-lived resource (engine, links, driver task). Several
replicas may run against one PostgreSQL: fetch requests and telemetry reach one replica each
(MQTT shared subscriptions), device state is upserted idempotently, and a rollout is driven by
whichever replica holds its lease.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import timedelta
from typing import Any

from cloud.gateway.balancer import PoolGateway
from cloud.mqtt.blob_server import BlobServer, RegistryOffer
from cloud.mqtt.control_link import CloudSession, ControlLink, ack_ids
from cloud.plane.auth import ApiKeys
from cloud.plane.desired import control_signer
from cloud.plane.fleet import DesiredRecord, Fleet, Selector
from cloud.plane.ingest import Ingest
from cloud.plane.rollouts import RolloutDriver, Rollouts, RolloutSpec
from cloud.plane.store import check_reachable, make_engine, migrate, utcnow
from cloud.plane.traffic import FleetTraffic
from cloud.ratelimit import TenantRateLimiter
from cloud.registry import ModelRegistry
from cloud.settings import CloudSettings
from shared.edge_config import EdgeConfig
from shared.errors import BrokerUnavailable, ContractError, ModelInUse, NotFound
from shared.messages import Command, CommandReply, DeviceStatus, ModelRef, ReportedState, TelemetryBatch
from shared.tasks import TaskSet
from shared.topics import Topics

log = logging.getLogger(__name__)
# How long one desired state may take to go out (the session's reconnection included).
PUBLISH_TIMEOUT_S = 30.0

SHARE_GROUP = "autoglm-cloud"
PUBLISH_CONCURRENCY = 200
# Acknowledgements in flight at once: when a fleet reports together, thousands are due within a
# second; more in flight than the session's window (64) only queue inside the MQTT client.
ACK_CONCURRENCY = 64
# Stored entries awaiting their acknowledgement past which more are dropped (the devices send
# them again): a session down for long under a flood of reports must not grow without bound.
ACK_BACKLOG = 100_000
# A device that refused its desired state as expired gets a freshly signed one, at most this often.
RESIGN_INTERVAL_S = 60.0


def preflight(settings: CloudSettings) -> None:
    """What would stop a control plane with ``settings`` starting, as a ConfigError naming it:
    the database out of reach, the control key missing or unreadable."""
    check_reachable(settings.database_url)
    control_signer(settings)


class ControlPlane:
    def __init__(self, settings: CloudSettings) -> None:
        self.settings = settings
        self.engine = make_engine(settings.database_url)
        applied = migrate(self.engine)
        if applied:
            log.info("database migrated to version %d", applied[-1])
        self.fleet = Fleet(self.engine)
        self.rollouts = Rollouts(
            self.engine, self.fleet, lambda tenant, name, version: self.registry(tenant).exists(name, version)
        )
        self.keys = ApiKeys(self.engine)
        self.driver = RolloutDriver(
            self.engine, self.fleet, owner=settings.replica_id, lease_s=settings.rollouts.lease_s
        )
        self.gateway = PoolGateway(settings.gateway)
        limit = settings.gateway.rate_limit
        self.rate_limiter = TenantRateLimiter(limit.requests_per_s, limit.burst)
        self.signer = control_signer(settings)
        log.info("signing desired states and commands with control key %s", self.signer.key.public.key_id)
        self._resigned: dict[tuple[str, str], float] = {}
        self._background = TaskSet(log)
        # (tenant, device, ids) stored and due to be acknowledged; ACK_CONCURRENCY senders.
        self._acks: asyncio.Queue[tuple[str, str, list[str]]] = asyncio.Queue(ACK_BACKLOG)
        self.acks_dropped = 0
        # One thread writes what devices report, in arrival order, many per transaction.
        # What the devices report serving, counted as it is stored (cloud/plane/traffic.py).
        self.traffic = FleetTraffic()
        self.ingest = Ingest(self.fleet, traffic=self.traffic)
        self.links: dict[str, ControlLink] = {}
        for tenant in settings.tenants:
            topics = Topics(tenant)
            self.links[tenant] = ControlLink(
                settings.broker,
                topics,
                BlobServer(self.registry(tenant).blobs, topics, offered=RegistryOffer(self.registry(tenant))),
                signer=self.signer,
                on_reported=self._on_reported(tenant),
                on_status=self._ingester(tenant),
                on_telemetry=self._ingester(tenant),
                share_group=SHARE_GROUP,
                auto_ack=False,
                keep_views=False,
            )

        # One session for every tenant: the broker binds a client id to the certificate's name.
        self.session = CloudSession(
            settings.broker, f"autoglm-cloud-{settings.replica_id}"[:64], list(self.links.values())
        )

    def registry(self, tenant: str) -> ModelRegistry:
        return ModelRegistry(self.settings.registry_dir / tenant)

    def _ingester(self, tenant: str) -> Any:
        """Store a device's message on the ingest thread; then acknowledge its records (or its
        report) to the device, which only now forgets them (end-to-end delivery, §4)."""

        def submit(message: ReportedState | DeviceStatus | TelemetryBatch) -> None:
            ids = ack_ids(message)
            self.ingest.put(
                tenant,
                message,
                (lambda: self._acknowledge(tenant, message.device_id, ids)) if ids else (lambda: None),
            )

        return submit

    @property
    def acks_pending(self) -> int:
        return self._acks.qsize()

    def _acknowledge(self, tenant: str, device_id: str, ids: list[str]) -> None:
        try:
            self._acks.put_nowait((tenant, device_id, ids))
        except asyncio.QueueFull:
            self.acks_dropped += 1

    async def send_acks(self) -> None:
        """One of the ACK_CONCURRENCY senders of acknowledgements (a lost one only means the
        device sends those entries again)."""
        while True:
            tenant, device_id, ids = await self._acks.get()
            link = self.links.get(tenant)
            if link is None:
                continue
            try:
                await link.send_ack(device_id, ids)
            except Exception:
                log.exception("could not acknowledge %d entries to %s", len(ids), device_id)

    def _on_reported(self, tenant: str) -> Any:
        store = self._ingester(tenant)

        def on_reported(reported: ReportedState) -> None:
            store(reported)
            error = reported.control_error
            if error is not None and error.code == "expired":
                self._resign(tenant, reported.device_id)

        return on_reported

    def _resign(self, tenant: str, device_id: str) -> None:
        """A device back after longer than the desired-state TTL refused the retained one as
        expired: publish the current desired state signed afresh."""
        loop = asyncio.get_running_loop()
        key = (tenant, device_id)
        if loop.time() - self._resigned.get(key, -RESIGN_INTERVAL_S) < RESIGN_INTERVAL_S:
            return
        self._resigned[key] = loop.time()

        async def go() -> None:
            record = await asyncio.to_thread(self.fleet.current_desired, tenant, device_id)
            if record is not None:
                log.info(
                    "re-signing the expired desired state of %s (revision %d)", device_id, record.revision
                )
                await self.publish([record])

        self._background.spawn(go(), name=f"resign-{device_id}")

    async def command(
        self, tenant: str, device_id: str, action: str, wait_s: float
    ) -> tuple[Command, CommandReply | None]:
        """Sign and send a command with the device's next counter; the reply if one came in time."""
        link = self.links.get(tenant)
        if link is None:
            raise NotFound("no such tenant", tenant=tenant)
        counter = await asyncio.to_thread(self.fleet.next_command_counter, tenant, device_id)
        command = Command(request_id=uuid.uuid4().hex[:16], action=action, counter=counter)  # type: ignore[arg-type]
        reply = await link.send_command(device_id, command, wait_s)
        return command, reply

    async def publish(self, items: list[DesiredRecord], *, wait_connected: bool = True) -> list[str]:
        """Sign and publish desired states, ``PUBLISH_CONCURRENCY`` at a time (QoS 1 acks
        overlap; one at a time is ~50/s under load). That many workers take the states in turn:
        a 10,000-device wave is not 10,000 tasks queued on a semaphore.

        ``wait_connected=False`` (the rollout driver's states) skips a tenant whose session is
        down instead of waiting up to 30 s per state for it (200 workers, 10,000 states: the
        driver would stall for 25 minutes); the driver publishes them again once the devices
        have waited 30 s.

        Returns the ids of the devices whose state did not go out (recorded, not published)."""
        pending = iter(items)
        skipped = 0
        failed: list[str] = []

        async def worker() -> None:
            nonlocal skipped
            for p in pending:
                link = self.links.get(p.tenant)
                if link is None:
                    failed.append(p.device_id)
                    continue
                if not wait_connected and not link.connected.is_set():
                    skipped += 1
                    failed.append(p.device_id)
                    continue
                try:
                    async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                        await link.set_desired(p.device_id, p.message())
                except Exception as exc:  # the driver re-publishes unapplied states
                    failed.append(p.device_id)
                    log.warning("could not publish desired state to %s: %r", p.device_id, exc)

        await asyncio.gather(*(worker() for _ in range(min(PUBLISH_CONCURRENCY, len(items)))))
        if skipped:
            log.warning(
                "the broker is unreachable: %d desired state(s) left for the driver to publish again", skipped
            )
        return failed

    # -- operations the REST API and the console share --------------------------------------
    def model_ref(self, tenant: str, model: str) -> ModelRef:
        """The registry's reference for ``name:version`` (NotFound when it has none)."""
        name, sep, version = model.partition(":")
        if not sep or not name or not version:
            raise ContractError("model is name:version", model=model)
        return self.registry(tenant).get(name, version).ref

    def create_rollout(self, tenant: str, model: str, waves: list[float], **fields: Any) -> dict[str, Any]:
        spec = RolloutSpec(model=self.model_ref(tenant, model), waves=tuple(waves), **fields)
        return self.rollouts.create(tenant, spec)

    def delete_model(self, tenant: str, name: str, version: str) -> int:
        """Remove a version from the registry; refused while a rollout uses it, or pool replicas
        serve it (their next pod could not fetch it). Bytes freed."""
        using = self.rollouts.in_use(tenant, name, version)
        if using:
            raise ModelInUse(f"model is used by rollout(s) {', '.join(using)}; finish or abort them first")
        # Devices told to run it (a finished rollout's target, an assignment): a device that
        # restarts, or is behind, would fetch a package that is gone.
        told = self.fleet.uses_model(tenant, name, version)
        if told:
            raise ModelInUse(
                f"{len(told)} device(s) are told to run {name}:{version} ({_some(told)}); roll them to another "
                "version first"
            )
        serving = [r.name for r in self.gateway.replicas if f"{name}:{version}" in (r.models or ())]
        if serving and self.registry(tenant).pool_digest(name, version) is not None:
            raise ModelInUse(
                f"pool replica(s) {', '.join(serving)} serve {name}:{version}; move the pool to another "
                "version first (the ConfigMap autoglm-pool)"
            )
        return self.registry(tenant).delete(name, version)

    async def push_config(self, tenant: str, selector: str, config: dict[str, Any]) -> list[str]:
        """Validate a serving config and make it the desired config of every device the selector
        matches (their models stay). Returns the devices' ids."""
        EdgeConfig.parse(config)  # the agent's own schema: refuse here what devices would refuse
        targets = await asyncio.to_thread(self.fleet.matching, tenant, Selector.parse(selector))
        if not targets:
            raise ContractError(f"no device matches the selector {selector!r}", selector=selector)
        items = await asyncio.to_thread(self.fleet.next_config_many, tenant, targets, config)
        failed = await self.publish(items)
        if failed:
            # Nothing publishes a config again later (the driver re-publishes rollouts' states
            # only): answered 200, it was lost while the broker was down.
            raise BrokerUnavailable(
                f"the config is recorded as the desired config of {len(items)} device(s) but could not be "
                f"published to {len(failed)} ({_some(failed)}): the MQTT broker is unreachable; push it again once "
                "it is back",
                devices=len(failed),
            )
        return [r.device_id for r in items]

    async def drive_forever(self) -> None:
        while True:
            try:
                items = await asyncio.to_thread(self.driver.tick)
                await self.publish(items, wait_connected=False)
            except Exception:
                log.exception("rollout tick failed; retrying")
            await asyncio.sleep(self.settings.rollouts.tick_s)

    async def prune_forever(self) -> None:
        """Delete the telemetry and device events older than ``history.retention_days``, now and
        every ``history.prune_every_s`` (every replica: deleting twice deletes nothing more)."""
        history = self.settings.history
        while True:
            before = utcnow() - timedelta(days=history.retention_days)
            try:
                records, events = await asyncio.to_thread(self.fleet.prune, before)
                if records or events:
                    log.info(
                        "deleted %d telemetry record(s) and %d device event(s) before %s",
                        records,
                        events,
                        before,
                    )
            except Exception:
                log.exception("pruning the history failed; retrying")
            await asyncio.sleep(history.prune_every_s)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.session.run(), name="mqtt")
            tg.create_task(self.drive_forever(), name="rollout-driver")
            tg.create_task(self.prune_forever(), name="history-pruning")
            tg.create_task(self.gateway.run_health_checks(), name="gateway-health")
            for i in range(ACK_CONCURRENCY):
                tg.create_task(self.send_acks(), name=f"acks-{i}")

    def close(self) -> None:
        self.ingest.close()
        self.engine.dispose()


def _some(ids: list[str]) -> str:
    """The first five of ``ids`` and how many more, for a message."""
    return ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
