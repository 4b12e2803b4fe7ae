"""The control-plane service: database, MQTT links per tenant, the rollout driver, the REST API,
and the fallback gateway in front of the pool.

The FastAPI lifespan owns every long-lived resource (engine, links, driver task). Several
replicas may run against one PostgreSQL: fetch requests and telemetry reach one replica each
(MQTT shared subscriptions), device state is upserted idempotently, and a rollout is driven by
whichever replica holds its lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI

from cloud.auth import ApiKeys
from cloud.blob_server import BlobServer, RegistryOffer
from cloud.control_link import ControlLink
from cloud.fleet import Fleet
from cloud.gateway import PoolGateway
from cloud.ratelimit import TenantRateLimiter
from cloud.registry import ModelRegistry
from cloud.rollouts import Publish, RolloutDriver, Rollouts
from cloud.settings import CloudSettings
from cloud.store import make_engine, migrate
from shared.messages import DesiredState, DeviceStatus, ModelRef, ReportedState, TelemetryBatch
from shared.topics import Topics

log = logging.getLogger(__name__)

SHARE_GROUP = "autoglm-cloud"
PUBLISH_CONCURRENCY = 200


class ControlPlane:
    def __init__(self, settings: CloudSettings) -> None:
        self.settings = settings
        self.engine = make_engine(settings.database_url)
        applied = migrate(self.engine)
        if applied:
            log.info("database migrated to version %d", applied[-1])
        self.fleet = Fleet(self.engine)
        self.rollouts = Rollouts(self.engine, self.fleet)
        self.keys = ApiKeys(self.engine)
        self.driver = RolloutDriver(
            self.engine, self.fleet, owner=settings.replica_id, lease_s=settings.rollouts.lease_s
        )
        self.gateway = PoolGateway(settings.gateway)
        limit = settings.gateway.rate_limit
        self.rate_limiter = TenantRateLimiter(limit.requests_per_s, limit.burst)
        # One thread writes what devices report, in arrival order, off the event loop.
        self._ingest = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest")
        self.links: dict[str, ControlLink] = {}
        for tenant in settings.tenants:
            topics = Topics(tenant)
            self.links[tenant] = ControlLink(
                settings.broker,
                topics,
                BlobServer(self.registry(tenant).blobs, topics, offered=RegistryOffer(self.registry(tenant))),
                client_id=f"autoglm-cloud-{settings.replica_id}-{tenant}"[:64],
                on_reported=self._ingester(tenant, self.fleet.record_reported),
                on_status=self._ingester(tenant, self.fleet.record_status),
                on_telemetry=self._ingester(tenant, self.fleet.record_telemetry),
                share_group=SHARE_GROUP,
            )

    def registry(self, tenant: str) -> ModelRegistry:
        return ModelRegistry(self.settings.registry_dir / tenant)

    def _ingester(self, tenant: str, fn: Any) -> Any:
        def submit(message: ReportedState | DeviceStatus | TelemetryBatch) -> None:
            future = self._ingest.submit(fn, tenant, message)
            future.add_done_callback(_log_failure)

        return submit

    async def publish(self, items: list[Publish]) -> None:
        """Publish desired states concurrently (QoS 1 acks overlap; one at a time is ~50/s under load)."""
        limit = asyncio.Semaphore(PUBLISH_CONCURRENCY)

        async def one(p: Publish) -> None:
            link = self.links.get(p.tenant)
            if link is None:
                return
            desired = DesiredState(
                revision=p.revision,
                model=ModelRef.model_validate(p.model) if p.model else None,
                config=p.config,
            )
            async with limit:
                try:
                    async with asyncio.timeout(30):
                        await link.set_desired(p.device_id, desired)
                except (TimeoutError, Exception) as exc:  # the driver re-publishes unapplied states
                    log.warning("could not publish desired state to %s: %s", p.device_id, exc)

        await asyncio.gather(*(one(p) for p in items))

    async def drive_forever(self) -> None:
        while True:
            try:
                items = await asyncio.to_thread(self.driver.tick)
                await self.publish(items)
            except Exception:
                log.exception("rollout tick failed; retrying")
            await asyncio.sleep(self.settings.rollouts.tick_s)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            for tenant, link in self.links.items():
                tg.create_task(link.run(), name=f"mqtt-{tenant}")
            tg.create_task(self.drive_forever(), name="rollout-driver")
            tg.create_task(self.gateway.run_health_checks(), name="gateway-health")

    def close(self) -> None:
        self._ingest.shutdown(wait=True)
        self.engine.dispose()


def _log_failure(future: Any) -> None:
    exc = future.exception()
    if exc is not None:
        log.error("could not store a device message", exc_info=exc)


def create_app(settings: CloudSettings) -> FastAPI:
    from cloud.api import install

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        plane = ControlPlane(settings)
        app.state.plane = plane
        task = asyncio.create_task(plane.run(), name="control-plane")
        app.state.plane_task = task
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            await plane.gateway.aclose()
            plane.close()

    app = FastAPI(title="Open-AutoGLM control plane", version="0.1.0", lifespan=lifespan)
    install(app)
    return app
