"""Serves blob chunks over MQTT: answers ``devices/+/fetch`` with publishes on ``blobs/{digest}/{i}``.

A device asks by chunk index (fixed-size chunks, on ``blobs/{digest}/{i}``) or by byte range (runs
of whole chunks of a blob cut at its tensor boundaries, one message each on
``blobs/{digest}/at/{offset}``). A fetch request is a device asking the cloud to publish bytes, so
what it may ask for is bounded: only blobs that the tenant's registry lists (its packages and
their signed manifests), only in the chunking the registry gives them (a client asking for other
pieces would otherwise flood the shared chunk topics with pieces that fit no one), and only as
many bytes per second as the device's token bucket holds. Refused parts are dropped with a log
line; a device asks again later.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiomqtt

from cloud.ratelimit import TokenBuckets
from shared.blobs import BlobRef, BlobStore, chunk_count_for
from shared.errors import ContractError, RegistryError
from shared.manifest import MANIFEST_CHUNK_SIZE
from shared.messages import BlobRequest, FetchRequest, from_device
from shared.mqtt import QOS
from shared.topics import Topics

if TYPE_CHECKING:
    from cloud.registry import ModelRegistry

log = logging.getLogger(__name__)

# A narrow seam for tests that need a chunk to arrive corrupted: (digest, byte offset, data) -> data.
ChunkFilter = Callable[[str, int, bytes], bytes]
# Chunk publishes awaiting their PUBACK at once (bench/RESULTS.md, shard_push.py).
PUBLISH_WINDOW = 4
# Per device: 64 MiB/s sustained, 256 MiB at once (a model's worth of chunks asked for in a burst).
DEVICE_BYTES_PER_S = 64 * 1024 * 1024
DEVICE_BURST_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class Layout:
    """One way a blob is listed as chunked: every ``chunk_size`` bytes, or at ``bounds`` (the
    offsets where its chunks start, and its size)."""

    chunk_size: int
    bounds: frozenset[int] | None = None

    def fits(self, offset: int, length: int, size: int) -> bool:
        """Whether [offset, offset+length) is a run of whole chunks a device of this layout asks for
        (no longer than one chunk size: the fetcher packs runs within one chunk-size cell)."""
        end = offset + length
        if not 0 <= offset < end <= size or length > self.chunk_size:
            return False
        if self.bounds is None:
            return offset % self.chunk_size == 0 and (end == size or end % self.chunk_size == 0)
        return offset in self.bounds and end in self.bounds


def layout_of(blob: BlobRef) -> Layout:
    if blob.ends is None:
        return Layout(blob.chunk_size)
    return Layout(blob.chunk_size, frozenset((0, *blob.ends)))


# The layouts a blob the tenant may fetch is listed with (one blob can be in several packages,
# each chunked its own way); empty for a blob it may not fetch.
OfferedLayouts = Callable[[str], frozenset[Layout]]


class RegistryOffer:
    """The layouts of every blob a tenant's registry lists, manifests included; re-read from the
    registry (at most once a second) when a device asks for a digest not seen yet."""

    def __init__(self, registry: ModelRegistry, refresh_s: float = 1.0) -> None:
        self.registry = registry
        self.refresh_s = refresh_s
        self._layouts: dict[str, frozenset[Layout]] = {}
        self._read_at = -float("inf")

    def __call__(self, digest: str, *, again: bool = False) -> frozenset[Layout]:
        """``again``: read the registry anew even for a digest seen before (once per refresh
        period), as when a request fits none of its known layouts: a package published since
        may list the blob chunked another way."""
        if (again or digest not in self._layouts) and time.monotonic() - self._read_at >= self.refresh_s:
            self._read_at = time.monotonic()
            layouts: dict[str, set[Layout]] = {}
            for entry in self.registry.list():
                layouts.setdefault(entry.digest, set()).add(Layout(MANIFEST_CHUNK_SIZE))
                for blob in entry.manifest.blobs():
                    layouts.setdefault(blob.digest, set()).add(layout_of(blob))
            self._layouts = {digest: frozenset(s) for digest, s in layouts.items()}
        return self._layouts.get(digest, frozenset())


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
        offered: OfferedLayouts | None = None,
        device_budget: TokenBuckets | None = None,
    ) -> None:
        """``offered`` None serves any blob of the store in any chunking (a bare store with no
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
        # What waits to go out, in request order: ("chunk", digest, chunk size, index) or
        # ("range", digest, offset, length). The chunk size is part of a chunk's key: one blob
        # listed in two packages with different chunkings has two chunk i.
        self._pending: dict[tuple[str, str, int, int], None] = {}
        self._drain: asyncio.Task[None] | None = None

    def detach(self) -> None:
        """The session is over (lost, or the link is stopping): stop publishing on it. What was
        pending is dropped, as when a publish fails: the devices ask again once a session is
        back, and a stop is not reported as a lost broker."""
        if self._drain is not None and not self._drain.done():
            self._drain.cancel()
        self._drain = None
        self._pending.clear()

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
        # One hop off the event loop for the whole request (a refresh reads every manifest of
        # the registry): four per blob, and a log line per refused one, let a device's flood of
        # requests for unknown digests hold the session every tenant shares for seconds.
        resolved = await asyncio.to_thread(self._resolve, request.blobs)
        refused: list[tuple[str, str]] = []
        for blob, parts in zip(request.blobs, resolved, strict=True):
            if isinstance(parts, str):
                refused.append((blob.digest, parts))
                self.chunks_refused += blob.parts
                continue
            for n, (key, nbytes) in enumerate(parts):
                if key in self._pending:
                    self.chunks_coalesced += 1
                elif self.device_budget.take(request.device_id, nbytes) > 0:
                    log.warning(
                        "device %s is over its fetch budget; %d part(s) of %s refused for now",
                        request.device_id,
                        len(parts) - n,
                        blob.digest,
                    )
                    self.chunks_refused += len(parts) - n
                    break
                else:
                    self._pending[key] = None
        if refused:
            digest, why = refused[0]
            log.warning(
                "refused %d blob(s) to %s, the first %s: %s", len(refused), request.device_id, digest, why
            )
        log.info(
            "fetch %s from %s: %d part(s) asked",
            request.request_id,
            request.device_id,
            sum(b.parts for b in request.blobs),
        )
        if self._drain is None or self._drain.done():
            self._drain = asyncio.create_task(self._publish_pending(client), name="blob-publisher")

    def _resolve(
        self, blobs: Sequence[BlobRequest]
    ) -> list[list[tuple[tuple[str, str, int, int], int]] | str]:
        """:meth:`_parts` of each blob, on a worker thread; a blob that fits none of its known
        layouts is judged again on a fresh read of the registry (a package published since may
        list it chunked another way)."""
        out = []
        for blob in blobs:
            parts = self._parts(blob, self.offered(blob.digest) if self.offered is not None else None)
            if isinstance(parts, str) and isinstance(self.offered, RegistryOffer):
                parts = self._parts(blob, self.offered(blob.digest, again=True))
            out.append(parts)
        return out

    def _parts(
        self, blob: BlobRequest, layouts: frozenset[Layout] | None
    ) -> list[tuple[tuple[str, str, int, int], int]] | str:
        """The pending keys (and their byte counts) ``blob`` asks for, or why it is refused."""
        if layouts is not None and not layouts:
            return "it is not offered to this tenant"
        try:
            size = self.store.size(blob.digest)
        except RegistryError:
            return "it is not in the store"
        if blob.chunks is not None:
            fixed = None if layouts is None else {lay.chunk_size for lay in layouts if lay.bounds is None}
            if fixed is not None and blob.chunk_size not in fixed:
                return f"it has fixed chunks of {sorted(fixed)} bytes (asked: {blob.chunk_size})"
            count = chunk_count_for(size, blob.chunk_size)
            if beyond := [i for i in blob.chunks if i >= count]:
                # Asked for anyway, it would fail the read and drop every device's pending chunks
                # of this blob.
                return f"chunk {beyond[0]} is past its last chunk ({count - 1})"
            return [(("chunk", blob.digest, blob.chunk_size, i), blob.chunk_size) for i in blob.chunks]
        assert blob.ranges is not None
        for offset, length in blob.ranges:
            if layouts is None:
                ok = offset + length <= size
            else:
                ok = any(lay.fits(offset, length, size) for lay in layouts)
            if not ok:
                return f"range [{offset}, +{length}) is not a run of its chunks"
        return [(("range", blob.digest, offset, length), length) for offset, length in blob.ranges]

    async def _publish_pending(self, client: aiomqtt.Client) -> None:
        # A QoS 1 publish returns at the broker's PUBACK: up to PUBLISH_WINDOW of them stay in
        # flight while the next part is read, instead of a read and a round trip per part in
        # turn. Their order on the wire is the order of the publish calls (tasks start in order).
        inflight: set[asyncio.Task[None]] = set()
        try:
            # Until nothing is pending and nothing in flight: a request that comes in while the
            # last publishes wait for their PUBACK joins this drain (no second one is started).
            while self._pending or inflight:
                if not self._pending or len(inflight) >= PUBLISH_WINDOW:
                    done, inflight = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
                    _raise_first(done)
                    continue
                key = next(iter(self._pending))
                kind, digest, a, b = key
                try:
                    if kind == "chunk":
                        offset = a * b
                        data = await asyncio.to_thread(self.store.read_chunk, digest, b, a)
                        topic = self.topics.blob_chunk(digest, b)
                    else:
                        offset = a
                        data = await asyncio.to_thread(self.store.read_range, digest, a, b)
                        topic = self.topics.blob_range(digest, a)
                except RegistryError as exc:
                    log.warning("asked for what we do not have: %s", exc)
                    self._drop_blob(digest)
                    continue
                if self.chunk_filter is not None:
                    data = self.chunk_filter(digest, offset, data)
                # Removed only now: a request for this part until here joins this publish.
                self._pending.pop(key, None)
                inflight.add(asyncio.create_task(self._publish(client, topic, data)))
        except aiomqtt.MqttError as exc:
            log.warning("lost the broker while publishing chunks (%s); devices will ask again", exc)
            self._pending.clear()
        finally:
            for task in inflight:
                task.cancel()
            # Retrieved, so that no failed publish is reported again as never retrieved.
            await asyncio.gather(*inflight, return_exceptions=True)

    async def _publish(self, client: aiomqtt.Client, topic: str, data: bytes) -> None:
        await client.publish(topic, data, qos=QOS)
        self.chunks_published += 1
        self.bytes_published += len(data)

    def _drop_blob(self, digest: str) -> None:
        for key in [k for k in self._pending if k[1] == digest]:
            del self._pending[key]


def _raise_first(done: set[asyncio.Task[None]]) -> None:
    """The first failure among finished publishes, every one of them retrieved."""
    errors = [task.exception() for task in done if not task.cancelled()]
    for error in errors:
        if error is not None:
            raise error
