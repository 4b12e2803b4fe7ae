"""Serves blob chunks over MQTT: answers ``devices/+/fetch`` with publishes on ``blobs/{digest}/{i}``.

A fetch request is a device asking the cloud to publish bytes, so what it may ask for is bounded:
only blobs that the tenant's registry lists (its packages and their signed manifests), only in the
chunk size the registry gives them (a client asking for other chunk sizes would otherwise flood
the shared chunk topics with pieces that fit no one), and only as many bytes per second as the
device's token bucket holds. Refused parts are dropped with a log line; a device asks again later.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import aiomqtt

from cloud.ratelimit import TokenBuckets
from shared.blobs import BlobStore
from shared.errors import ContractError, RegistryError
from shared.manifest import MANIFEST_CHUNK_SIZE
from shared.messages import FetchRequest, from_device
from shared.mqtt import QOS
from shared.topics import Topics

if TYPE_CHECKING:
    from cloud.registry import ModelRegistry

log = logging.getLogger(__name__)

# A narrow seam for tests that need a chunk to arrive corrupted: (digest, index, data) -> data.
ChunkFilter = Callable[[str, int, bytes], bytes]
# The chunk sizes a blob the tenant may fetch is listed with (one blob can be in several packages,
# each chunked its own way); empty for a blob it may not fetch.
OfferedChunkSizes = Callable[[str], frozenset[int]]
# Per device: 64 MiB/s sustained, 256 MiB at once (a model's worth of chunks asked for in a burst).
DEVICE_BYTES_PER_S = 64 * 1024 * 1024
DEVICE_BURST_BYTES = 256 * 1024 * 1024


class RegistryOffer:
    """The chunk sizes of every blob a tenant's registry lists, manifests included; re-read from
    the registry (at most once a second) when a device asks for a digest not seen yet."""

    def __init__(self, registry: ModelRegistry, refresh_s: float = 1.0) -> None:
        self.registry = registry
        self.refresh_s = refresh_s
        self._sizes: dict[str, frozenset[int]] = {}
        self._read_at = -float("inf")

    def __call__(self, digest: str) -> frozenset[int]:
        if digest not in self._sizes and time.monotonic() - self._read_at >= self.refresh_s:
            self._read_at = time.monotonic()
            sizes: dict[str, set[int]] = {}
            for entry in self.registry.list():
                sizes.setdefault(entry.digest, set()).add(MANIFEST_CHUNK_SIZE)
                for blob in entry.manifest.blobs():
                    sizes.setdefault(blob.digest, set()).add(blob.chunk_size)
            self._sizes = {digest: frozenset(s) for digest, s in sizes.items()}
        return self._sizes.get(digest, frozenset())


class BlobServer:
    """Publishes the chunks devices ask for, straight from the registry's blob store.

    Requests are coalesced: a chunk asked for while it is still waiting to go out is published
    once, and every device subscribed to that blob receives it (chunk topics are shared)."""

    def __init__(
        self,
        store: BlobStore,
        topics: Topics,
        chunk_filter: ChunkFilter | None = None,
        *,
        offered: OfferedChunkSizes | None = None,
        device_budget: TokenBuckets | None = None,
    ) -> None:
        """``offered`` None serves any blob of the store in any chunk size (a bare store with no
        registry: low-level tests and benchmarks); the control plane always passes a RegistryOffer."""
        self.store = store
        self.topics = topics
        self.chunk_filter = chunk_filter
        self.offered = offered
        self.device_budget = device_budget or TokenBuckets(DEVICE_BYTES_PER_S, DEVICE_BURST_BYTES)
        self.chunks_refused = 0
        self.chunks_published = 0
        self.chunks_coalesced = 0
        self.bytes_published = 0
        # (digest, chunk size, index) waiting to go out, in request order. The chunk size is part of
        # the key: one blob listed in two packages with different chunkings has two chunk i.
        self._pending: dict[tuple[str, int, int], None] = {}
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
            # A refresh reads every manifest of the registry: off the event loop.
            sizes = await asyncio.to_thread(self.offered, blob.digest) if self.offered is not None else None
            if sizes is not None and blob.chunk_size not in sizes:
                why = f"has chunks of {sorted(sizes)} bytes" if sizes else "is not offered to this tenant"
                log.warning(
                    "refused blob %s to %s: it %s (asked: %d)",
                    blob.digest,
                    request.device_id,
                    why,
                    blob.chunk_size,
                )
                self.chunks_refused += len(blob.chunks)
                continue
            for n, index in enumerate(blob.chunks):
                key = (blob.digest, blob.chunk_size, index)
                if key in self._pending:
                    self.chunks_coalesced += 1
                elif self.device_budget.take(request.device_id, blob.chunk_size) > 0:
                    log.warning(
                        "device %s is over its fetch budget; %d chunk(s) of %s refused for now",
                        request.device_id,
                        len(blob.chunks) - n,
                        blob.digest,
                    )
                    self.chunks_refused += len(blob.chunks) - n
                    break
                else:
                    self._pending[key] = None
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
            digest, chunk_size, index = next(iter(self._pending))
            try:
                data = await asyncio.to_thread(self.store.read_chunk, digest, index, chunk_size)
            except RegistryError as exc:
                log.warning("asked for what we do not have: %s", exc)
                self._drop_blob(digest)
                continue
            if self.chunk_filter is not None:
                data = self.chunk_filter(digest, index, data)
            # Removed only now: a request for this chunk until here joins this publish.
            self._pending.pop((digest, chunk_size, index), None)
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
