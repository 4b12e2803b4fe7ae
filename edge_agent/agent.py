"""EdgeAgent: wires settings, MQTT link, fetcher, reconciler and the model host together."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil

from edge_agent.fetcher import ShardFetcher
from edge_agent.link import CloudLink
from edge_agent.model_host import ModelHost
from edge_agent.reconciler import Reconciler
from edge_agent.runtime.session import choose_providers
from edge_agent.settings import EdgeSettings
from edge_agent.slots import SlotStore
from edge_agent.state import AgentState, StateFile
from shared.blobs import BlobStore
from shared.manifest import TrustStore
from shared.messages import Capabilities, DesiredState, ReportedState
from shared.topics import Topics

log = logging.getLogger(__name__)


class EdgeAgent:
    def __init__(self, settings: EdgeSettings) -> None:
        self.settings = settings
        data = settings.data_dir
        data.mkdir(parents=True, exist_ok=True)
        self.topics = Topics(settings.tenant)
        self.cache = BlobStore(data / "blobs")
        self.host = ModelHost()
        self.link = CloudLink(
            settings.broker,
            self.topics,
            settings.device_id,
            on_desired=self._on_desired,
            on_chunk=self._on_chunk,
        )
        self.fetcher = ShardFetcher(
            settings.device_id,
            self.cache,
            data / "partial",
            self.link,
            chunks_per_request=settings.fetch.chunks_per_request,
            request_timeout_s=settings.fetch.request_timeout_s,
            max_attempts_without_progress=settings.fetch.max_attempts_without_progress,
        )
        self.reconciler = Reconciler(
            StateFile(data / "state.json"),
            self.fetcher,
            self.cache,
            SlotStore(data / "slots"),
            self.host,
            TrustStore(settings.public_keys()),
            settings.runtime,
            self._report,
        )

        log.info(
            "device %s (tenant %s) trusts manifest keys %s",
            settings.device_id,
            settings.tenant,
            ", ".join(self.reconciler.trust.key_ids),
        )

    def _on_desired(self, desired: DesiredState) -> None:
        self.reconciler.offer(desired)

    def _on_chunk(self, digest: str, index: int, data: bytes) -> None:
        self.fetcher.on_chunk(digest, index, data)

    def capabilities(self) -> Capabilities:
        try:
            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            memory = 0
        return Capabilities(
            providers=choose_providers(self.settings.runtime.providers),
            memory_bytes=memory,
            disk_free_bytes=shutil.disk_usage(self.settings.data_dir).free,
        )

    def reported_state(self, state: AgentState | None = None) -> ReportedState:
        s = state or self.reconciler.state
        return ReportedState(
            device_id=self.settings.device_id,
            revision=s.applied_revision,
            phase=s.phase,
            active_slot=s.active_slot,
            slots=dict(s.slots),
            last_error=s.last_error,
            capabilities=self.capabilities(),
        )

    async def _report(self, state: AgentState) -> None:
        await self.link.publish_retained(
            self.topics.reported(self.settings.device_id), self.reported_state(state).to_json()
        )

    async def run(self) -> None:
        """Run the link and the reconciler until cancelled."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.link.run(), name="mqtt-link")
            tg.create_task(self.reconciler.run(), name="reconciler")
