"""Serves blob chunks over MQTT: answers ``devices/+/fetch`` with publishes on ``blobs/{digest}/{i}``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import aiomqtt

from shared.blobs import BlobStore
from shared.errors import ContractError, RegistryError
from shared.messages import FetchRequest
from shared.mqtt import QOS
from shared.topics import Topics

log = logging.getLogger(__name__)

# A narrow seam for tests that need a chunk to arrive corrupted: (digest, index, data) -> data.
ChunkFilter = Callable[[str, int, bytes], bytes]


class BlobServer:
    """Publishes the chunks devices ask for, straight from the registry's blob store."""

    def __init__(self, store: BlobStore, topics: Topics, chunk_filter: ChunkFilter | None = None) -> None:
        self.store = store
        self.topics = topics
        self.chunk_filter = chunk_filter
        self.chunks_published = 0

    async def subscribe(self, client: aiomqtt.Client) -> None:
        await client.subscribe(self.topics.all_devices("fetch"), qos=QOS)

    def handles(self, topic: str) -> bool:
        return aiomqtt.Topic(topic).matches(self.topics.all_devices("fetch"))

    async def handle(self, client: aiomqtt.Client, topic: str, payload: bytes) -> None:
        try:
            parsed = self.topics.parse(topic)
            request = FetchRequest.from_json(payload)
            if request.device_id != parsed.device_id:
                raise ContractError("fetch request device_id does not match its topic", topic=topic)
        except ContractError as exc:
            log.warning("dropped fetch request on %s: %s", topic, exc)
            return
        for blob in request.blobs:
            for index in blob.chunks:
                try:
                    data = await asyncio.to_thread(self.store.read_chunk, blob.digest, index, blob.chunk_size)
                except RegistryError as exc:
                    log.warning("device %s asked for what we do not have: %s", request.device_id, exc)
                    break
                if self.chunk_filter is not None:
                    data = self.chunk_filter(blob.digest, index, data)
                await client.publish(self.topics.blob_chunk(blob.digest, index), data, qos=QOS)
                self.chunks_published += 1
        log.info(
            "served fetch %s from %s: %d chunk(s)",
            request.request_id,
            request.device_id,
            sum(len(b.chunks) for b in request.blobs),
        )
