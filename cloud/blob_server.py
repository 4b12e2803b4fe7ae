"""Serves blob chunks over MQTT: answers ``devices/+/fetch`` with publishes on ``blobs/{digest}/{i}``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import aiomqtt

from shared.blobs import BlobStore
from shared.errors import ContractError, RegistryError
from shared.messages import FetchRequest, from_device
from shared.mqtt import QOS
from shared.topics import Topics

log = logging.getLogger(__name__)

# A narrow seam for tests that need a chunk to arrive corrupted: (digest, index, data) -> data.
ChunkFilter = Callable[[str, int, bytes], bytes]


class BlobServer:
    """Publishes the chunks devices ask for, straight from the registry's blob store.

    Requests are coalesced: a chunk asked for while it is still waiting to go out is published
    once, and every device subscribed to that blob receives it (chunk topics are shared)."""

    def __init__(self, store: BlobStore, topics: Topics, chunk_filter: ChunkFilter | None = None) -> None:
        self.store = store
        self.topics = topics
        self.chunk_filter = chunk_filter
        self.chunks_published = 0
        self.chunks_coalesced = 0
        self.bytes_published = 0
        self._pending: dict[tuple[str, int], int] = {}
        self._drain: asyncio.Task[None] | None = None

    async def subscribe(self, client: aiomqtt.Client, share_group: str | None = None) -> None:
        flt = self.topics.all_devices("fetch")
        await client.subscribe(f"$share/{share_group}/{flt}" if share_group else flt, qos=QOS)

    def handles(self, topic: str) -> bool:
        return aiomqtt.Topic(topic).matches(self.topics.all_devices("fetch"))

    async def handle(self, client: aiomqtt.Client, topic: str, payload: bytes) -> None:
        try:
            parsed = self.topics.parse(topic)
            request = from_device(FetchRequest, payload, parsed.device_id, topic)
        except ContractError as exc:
            log.warning("dropped fetch request on %s: %s", topic, exc)
            return
        for blob in request.blobs:
            for index in blob.chunks:
                key = (blob.digest, index)
                if key in self._pending:
                    self.chunks_coalesced += 1
                else:
                    self._pending[key] = blob.chunk_size
        log.info(
            "fetch %s from %s: %d chunk(s) asked",
            request.request_id,
            request.device_id,
            sum(len(b.chunks) for b in request.blobs),
        )
        if self._drain is None or self._drain.done():
            self._drain = asyncio.create_task(self._publish_pending(client), name="blob-publisher")

    async def _publish_pending(self, client: aiomqtt.Client) -> None:
        while self._pending:
            (digest, index), chunk_size = next(iter(self._pending.items()))
            try:
                data = await asyncio.to_thread(self.store.read_chunk, digest, index, chunk_size)
            except RegistryError as exc:
                log.warning("asked for what we do not have: %s", exc)
                self._drop_blob(digest)
                continue
            if self.chunk_filter is not None:
                data = self.chunk_filter(digest, index, data)
            # Removed only now: a request for this chunk until here joins this publish.
            self._pending.pop((digest, index), None)
            try:
                await client.publish(self.topics.blob_chunk(digest, index), data, qos=QOS)
            except aiomqtt.MqttError as exc:
                log.warning("lost the broker while publishing chunks (%s); devices will ask again", exc)
                self._pending.clear()
                return
            self.chunks_published += 1
            self.bytes_published += len(data)

    def _drop_blob(self, digest: str) -> None:
        for key in [k for k in self._pending if k[0] == digest]:
            del self._pending[key]
