"""ShardFetcher against real mosquitto and the real BlobServer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cloud.mqtt.blob_server import BlobServer
from cloud.mqtt.control_link import ControlLink
from edge_agent.update.fetcher import ChunkIndex, ShardFetcher, chunk_index
from edge_agent.uplink.link import CloudLink
from shared.blobs import BlobRef, BlobStore, describe_bytes
from shared.errors import FetchError
from shared.messages import FetchRequest
from shared.mqtt import BrokerSettings
from shared.topics import Topics
from tests.services import until

CHUNK = 64 * 1024


@contextlib.asynccontextmanager
async def _wired(
    broker: BrokerSettings, tenant: str, tmp: Path, store: BlobStore, server: BlobServer, **fetch_kw: object
) -> AsyncIterator[ShardFetcher]:
    topics = Topics(tenant)
    cloud = ControlLink(broker, topics, server, client_id=f"cloud-{tenant}")
    fetcher: ShardFetcher | None = None

    def on_chunk(d: str, i: int, data: bytes) -> None:
        assert fetcher is not None
        fetcher.on_chunk(d, i, data)

    def on_range(d: str, offset: int, data: bytes) -> None:
        assert fetcher is not None
        fetcher.on_range(d, offset, data)

    link = CloudLink(
        broker, topics, "dev-1", on_desired=lambda _d: None, on_chunk=on_chunk, on_range=on_range
    )
    fetcher = ShardFetcher("dev-1", BlobStore(tmp / "cache"), tmp / "partial", link, **fetch_kw)  # type: ignore[arg-type]
    tasks = [asyncio.create_task(cloud.run()), asyncio.create_task(link.run())]
    try:
        await asyncio.wait_for(asyncio.gather(cloud.connected.wait(), link.connected.wait()), 10)
        yield fetcher
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _fetch(
    broker: BrokerSettings,
    tenant: str,
    tmp: Path,
    store: BlobStore,
    server: BlobServer,
    blobs: list[BlobRef],
    reuse: ChunkIndex | None = None,
    **fetch_kw: object,
) -> ShardFetcher:
    """One device fetches ``blobs`` from ``server`` over the test broker; its fetcher, after."""

    async def scenario() -> ShardFetcher:
        async with _wired(broker, tenant, tmp, store, server, **fetch_kw) as fetcher:
            await asyncio.wait_for(fetcher.fetch_blobs(blobs, reuse), 30)
            return fetcher

    return asyncio.run(scenario())


def _blob(store: BlobStore, size: int) -> tuple[bytes, BlobRef]:
    data = os.urandom(size)
    store.put_bytes(data)
    return data, describe_bytes(data, CHUNK)


def test_corrupt_chunk_is_refetched_alone(
    broker_settings: BrokerSettings, tenant: str, tmp_path: Path
) -> None:
    store = BlobStore(tmp_path / "cloud")
    data, ref = _blob(store, 10 * CHUNK + 123)
    corrupted: list[int] = []

    def corrupt_chunk_3_once(digest: str, offset: int, chunk: bytes) -> bytes:
        if offset == 3 * CHUNK and not corrupted:
            corrupted.append(offset)
            return chunk[:-1] + bytes([chunk[-1] ^ 0xFF])
        return chunk

    server = BlobServer(store, Topics(tenant), chunk_filter=corrupt_chunk_3_once)

    fetcher = _fetch(broker_settings, tenant, tmp_path, store, server, [ref], chunks_per_request=64)
    assert corrupted == [3 * CHUNK]
    assert fetcher.cache.read(ref.digest) == data
    asked = Counter(i for _, i in fetcher.stats.requested)
    assert asked[3] == 2, "the corrupt chunk is asked for again"
    assert all(n == 1 for i, n in asked.items() if i != 3), "no other chunk is asked for twice"
    assert fetcher.stats.chunks_rejected == 1
    assert server.chunks_published == ref.chunk_count + 1


def test_resume_asks_only_for_missing_chunks(
    broker_settings: BrokerSettings, tenant: str, tmp_path: Path
) -> None:
    store = BlobStore(tmp_path / "cloud")
    data, ref = _blob(store, 8 * CHUNK)
    # A previous run left chunks 0-4 on disk, and a torn chunk 5.
    partial = tmp_path / "partial"
    partial.mkdir()
    part = partial / (ref.digest.split(":")[1] + ".part")
    part.write_bytes(data[: 5 * CHUNK] + data[5 * CHUNK : 5 * CHUNK + 100])
    server = BlobServer(store, Topics(tenant))

    fetcher = _fetch(broker_settings, tenant, tmp_path, store, server, [ref])
    assert fetcher.cache.read(ref.digest) == data
    assert sorted(i for _, i in fetcher.stats.requested) == [5, 6, 7]
    assert not part.exists()


def test_resume_hashes_the_partial_file_off_the_event_loop(
    broker_settings: BrokerSettings, tenant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hashing stands in for a multi-GB partial: 20 ms per chunk, 0.6 s in all. The loop keeps
    ticking meanwhile (it serves the local API)."""
    import time

    from edge_agent.update import fetcher as fetcher_module

    store = BlobStore(tmp_path / "cloud")
    data, ref = _blob(store, 30 * CHUNK)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / (ref.digest.split(":")[1] + ".part")).write_bytes(data[: 29 * CHUNK])
    real_hash = fetcher_module.sha256_hex

    def slow_hash(chunk: bytes) -> str:
        time.sleep(0.02)
        return real_hash(chunk)

    monkeypatch.setattr(fetcher_module, "sha256_hex", slow_hash)
    server = BlobServer(store, Topics(tenant))

    async def scenario() -> tuple[ShardFetcher, float]:
        gaps: list[float] = []

        async def heartbeat() -> None:
            last = time.monotonic()
            while True:
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        async with _wired(broker_settings, tenant, tmp_path, store, server) as fetcher:
            beat = asyncio.create_task(heartbeat())
            await asyncio.wait_for(fetcher.fetch_blobs([ref]), 30)
            beat.cancel()
            return fetcher, max(gaps)

    fetcher, longest_gap = asyncio.run(scenario())
    assert fetcher.cache.read(ref.digest) == data
    assert sorted(i for _, i in fetcher.stats.requested) == [29]
    assert longest_gap < 0.3, f"the event loop stalled {longest_gap:.2f}s"


def test_duplicates_are_ignored(broker_settings: BrokerSettings, tenant: str, tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "cloud")
    data, ref = _blob(store, 4 * CHUNK)

    class DoublingServer(BlobServer):
        async def handle(self, client, topic, payload):  # type: ignore[no-untyped-def]
            await super().handle(client, topic, payload)
            await super().handle(client, topic, payload)

    async def scenario() -> ShardFetcher:
        async with _wired(
            broker_settings, tenant, tmp_path, store, DoublingServer(store, Topics(tenant))
        ) as f:
            await asyncio.wait_for(f.fetch_blobs([ref]), 30)
            await asyncio.sleep(0.3)
            return f

    fetcher = asyncio.run(scenario())
    assert fetcher.cache.read(ref.digest) == data
    assert fetcher.stats.chunks_received == ref.chunk_count


def test_unanswered_fetch_gives_up_with_a_clear_error(
    broker_settings: BrokerSettings, tenant: str, tmp_path: Path
) -> None:
    store = BlobStore(tmp_path / "cloud")
    _, ref = _blob(store, CHUNK)
    store.remove(ref.digest)  # the cloud no longer has it

    async def scenario() -> None:
        async with _wired(
            broker_settings,
            tenant,
            tmp_path,
            store,
            BlobServer(store, Topics(tenant)),
            request_timeout_s=0.3,
            max_attempts_without_progress=3,
        ) as fetcher:
            await fetcher.fetch_blobs([ref])

    with pytest.raises(FetchError, match="no chunk arrived"):
        asyncio.run(scenario())


def test_refuses_a_model_larger_than_free_disk(
    broker_settings: BrokerSettings, tenant: str, tmp_path: Path
) -> None:
    huge = BlobRef(digest="sha256:" + "1" * 64, size=1 << 60, chunk_size=CHUNK, chunks=["0" * 64])

    async def scenario() -> None:
        store = BlobStore(tmp_path / "cloud")
        async with _wired(
            broker_settings, tenant, tmp_path, store, BlobServer(store, Topics(tenant))
        ) as fetcher:
            await fetcher.fetch_blobs([huge])

    with pytest.raises(FetchError, match="free on disk"):
        asyncio.run(scenario())


def test_delta_update_downloads_only_changed_chunks(
    broker_settings: BrokerSettings, tenant: str, tmp_path: Path
) -> None:
    store = BlobStore(tmp_path / "cloud")
    old, old_ref = _blob(store, 20 * CHUNK + 77)
    new = bytearray(old)
    for i in (2, 11):  # two changed chunks out of 21
        new[i * CHUNK + 5] ^= 0xFF
    store.put_bytes(bytes(new))
    new_ref = describe_bytes(bytes(new), CHUNK)
    local = tmp_path / "slot-a-model.bin"
    local.write_bytes(old)
    server = BlobServer(store, Topics(tenant))

    fetcher = _fetch(
        broker_settings, tenant, tmp_path, store, server, [new_ref], chunk_index([(local, old_ref)])
    )
    assert fetcher.cache.read(new_ref.digest) == bytes(new)
    assert sorted(i for _, i in fetcher.stats.requested) == [2, 11]
    assert fetcher.stats.chunks_reused == 19
    assert server.chunks_published == 2


def _tensor_file(sizes: list[int], seed: int = 0) -> tuple[bytearray, list[int]]:
    """Random bytes laid out as tensors of these sizes; the offsets where each starts and ends."""
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(sum(sizes)))
    cuts, at = [], 0
    for n in sizes:
        cuts += [at, at + n]
        at += n
    return data, cuts


# Tensors of awkward sizes: larger than a chunk, smaller, and tiny ones between them (norms).
SIZES = [3 * CHUNK + 4000, 900, CHUNK - 1, 2 * CHUNK + 17, 1500, 5 * CHUNK + 3, 700, CHUNK + CHUNK // 3] * 3


def test_a_blob_cut_at_tensors_arrives_in_ranges_no_more_messages_than_fixed_chunks(
    broker_settings: BrokerSettings, tenant: str, tmp_path: Path
) -> None:
    store = BlobStore(tmp_path / "cloud")
    data, cuts = _tensor_file(SIZES)
    store.put_bytes(bytes(data))
    ref = describe_bytes(bytes(data), CHUNK, cuts)
    assert ref.cut and ref.chunk_count > describe_bytes(bytes(data), CHUNK).chunk_count
    server = BlobServer(store, Topics(tenant))

    fetcher = _fetch(broker_settings, tenant, tmp_path, store, server, [ref], chunks_per_request=64)
    assert fetcher.cache.read(ref.digest) == bytes(data)
    assert fetcher.stats.chunks_received == ref.chunk_count
    assert fetcher.stats.strays == 0 and fetcher.stats.duplicates == 0
    # Each chunk was checked on its own, yet they travelled packed: one message per fixed-size cell.
    assert server.chunks_published == describe_bytes(bytes(data), CHUNK).chunk_count


def test_a_delta_of_blobs_cut_at_tensors_sends_exactly_the_changed_tensors(
    broker_settings: BrokerSettings, tenant: str, tmp_path: Path
) -> None:
    store = BlobStore(tmp_path / "cloud")
    old, cuts = _tensor_file(SIZES)
    old_ref = describe_bytes(bytes(old), CHUNK, cuts)
    new = bytearray(old)
    rng = random.Random(7)
    changed = 0
    for t in (0, 4, 13, 21):  # a big tensor, a tiny one, and two of middling size
        start, end = cuts[2 * t], cuts[2 * t + 1]
        new[start:end] = rng.randbytes(end - start)
        changed += end - start
    store.put_bytes(bytes(new))
    new_ref = describe_bytes(bytes(new), CHUNK, cuts)
    local = tmp_path / "slot-a-weights.bin"
    local.write_bytes(bytes(old))
    server = BlobServer(store, Topics(tenant))

    fetcher = _fetch(
        broker_settings,
        tenant,
        tmp_path,
        store,
        server,
        [new_ref],
        chunk_index([(local, old_ref)]),
        chunks_per_request=64,
    )
    assert fetcher.cache.read(new_ref.digest) == bytes(new)
    assert server.bytes_published == changed, "only the changed tensors' bytes went over the wire"
    assert fetcher.stats.bytes_reused == len(new) - changed


def test_a_damaged_chunk_inside_a_range_is_asked_for_alone(
    broker_settings: BrokerSettings, tenant: str, tmp_path: Path
) -> None:
    store = BlobStore(tmp_path / "cloud")
    data, cuts = _tensor_file(SIZES)
    store.put_bytes(bytes(data))
    ref = describe_bytes(bytes(data), CHUNK, cuts)
    victim = next(i for i in range(ref.chunk_count) if ref.chunk_length(i) < 2000)  # a tiny tensor
    at = ref.chunk_offset(victim)
    damaged: list[int] = []

    def damage_once(digest: str, offset: int, chunk: bytes) -> bytes:
        if offset <= at < offset + len(chunk) and len(chunk) > ref.chunk_length(victim) and not damaged:
            damaged.append(offset)
            i = at - offset
            return chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1 :]
        return chunk

    server = BlobServer(store, Topics(tenant), chunk_filter=damage_once)

    fetcher = _fetch(broker_settings, tenant, tmp_path, store, server, [ref], chunks_per_request=64)
    assert damaged, "the victim chunk travelled inside a larger range"
    assert fetcher.cache.read(ref.digest) == bytes(data)
    asked = Counter(i for _, i in fetcher.stats.requested)
    assert asked[victim] == 2 and all(n == 1 for i, n in asked.items() if i != victim)
    assert fetcher.stats.chunks_rejected == 1


def test_ranges_that_are_no_run_of_offered_chunks_are_refused(tmp_path: Path) -> None:
    """A device may not make the cloud publish pieces that fit no layout (other devices of the
    blob would receive them): only runs of whole chunks of a listed layout, at most two chunks."""
    from cloud.mqtt.blob_server import layout_of
    from shared.messages import BlobRequest

    store = BlobStore(tmp_path / "cloud")
    data, cuts = _tensor_file(SIZES)
    store.put_bytes(bytes(data))
    ref = describe_bytes(bytes(data), CHUNK, cuts)
    server = BlobServer(
        store, Topics("t"), offered=lambda d: frozenset({layout_of(ref)}) if d == ref.digest else frozenset()
    )

    def parts(*ranges: tuple[int, int]) -> object:
        return server._parts(
            BlobRequest(digest=ref.digest, chunk_size=CHUNK, ranges=list(ranges)), server.offered(ref.digest)
        )  # type: ignore[misc]

    small = next(
        i for i in range(ref.chunk_count - 1) if ref.chunk_length(i) + ref.chunk_length(i + 1) < CHUNK
    )
    assert isinstance(
        parts((ref.chunk_offset(small), ref.chunk_length(small) + ref.chunk_length(small + 1))), list
    )
    assert isinstance(parts((0, ref.chunk_length(0) + ref.chunk_length(1))), str)  # longer than a chunk
    assert isinstance(parts((ref.chunk_offset(1) + 1, ref.chunk_length(1))), str)  # not at a chunk start
    assert isinstance(parts((ref.chunk_offset(1), ref.chunk_length(1) - 1)), str)  # ends inside a chunk
    assert isinstance(parts((0, len(data))), str)  # the whole blob
    assert isinstance(
        server._parts(
            BlobRequest(digest=ref.digest, chunk_size=CHUNK, chunks=[0]), server.offered(ref.digest)
        ),
        str,
    ), "a blob offered only cut at tensors is not served in fixed chunks"


def test_a_first_update_to_tensor_cut_chunks_reuses_the_fixed_chunked_version_at_the_same_offsets(
    broker_settings: BrokerSettings, tenant: str, tmp_path: Path
) -> None:
    """A device holds v1 packaged with fixed-size chunks (no chunk hash in common with a v3
    layout): the unchanged tensors are still found, at their own offsets in the same file."""
    store = BlobStore(tmp_path / "cloud")
    old, cuts = _tensor_file(SIZES)
    old_ref = describe_bytes(bytes(old), CHUNK)  # fixed chunks
    new = bytearray(old)
    start, end = cuts[2 * 5], cuts[2 * 5 + 1]
    new[start:end] = random.Random(3).randbytes(end - start)
    store.put_bytes(bytes(new))
    new_ref = describe_bytes(bytes(new), CHUNK, cuts)
    local = tmp_path / "slot-a" / "model.onnx.data"
    local.parent.mkdir()
    local.write_bytes(bytes(old))
    server = BlobServer(store, Topics(tenant))

    fetcher = _fetch(
        broker_settings,
        tenant,
        tmp_path,
        store,
        server,
        [new_ref],
        chunk_index([(local, old_ref)], {new_ref.digest: [local, tmp_path / "gone.data"]}),
        chunks_per_request=64,
    )
    assert fetcher.cache.read(new_ref.digest) == bytes(new)
    assert server.bytes_published == end - start, "only the changed tensor was downloaded"


def test_chunks_of_another_chunking_of_the_blob_are_strays_not_damage(tmp_path: Path) -> None:
    """Devices of an older package ask for the same weights by fixed chunk index; those messages
    reach this device too (same blob topics) and must neither count as damage nor block the
    real piece."""
    data, cuts = _tensor_file(SIZES)
    ref = describe_bytes(bytes(data), CHUNK, cuts)

    class Nowhere:
        async def subscribe_blob(self, digest: str) -> None: ...
        async def unsubscribe_blob(self, digest: str) -> None: ...
        async def send_fetch(self, request: object) -> None: ...

    async def scenario() -> ShardFetcher:
        fetcher = ShardFetcher("d", BlobStore(tmp_path / "c"), tmp_path / "p", Nowhere())  # type: ignore[arg-type]
        task = asyncio.create_task(fetcher.fetch_blobs([ref]))
        for _ in range(500):  # until the transfer is open (it subscribes first)
            if ref.digest in fetcher._active:
                break
            await asyncio.sleep(0.01)
        for i in range(3):
            for _ in range(6):  # more often than max_chunk_rejections
                fetcher.on_chunk(ref.digest, i, bytes(data[i * CHUNK : (i + 1) * CHUNK]))
        await asyncio.sleep(0.1)
        t = fetcher._active[ref.digest]
        assert not t.rejections and not t.writing and not t.have
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return fetcher

    fetcher = asyncio.run(scenario())
    assert fetcher.stats.strays == 18 and fetcher.stats.chunks_rejected == 0


def test_the_next_window_is_asked_for_while_the_last_one_still_arrives(tmp_path: Path) -> None:
    """The link never idles between windows: once half a window has landed the next is asked
    for, at most 1.5 windows are in flight, and no chunk is asked for twice."""
    data = random.Random(3).randbytes(12 * CHUNK)
    ref = describe_bytes(data, CHUNK)
    asked: list[list[int]] = []

    class Recorder:
        async def subscribe_blob(self, digest: str) -> None: ...
        async def unsubscribe_blob(self, digest: str) -> None: ...
        async def send_fetch(self, request: FetchRequest) -> None:
            asked.append(list(request.blobs[0].chunks or []))

    def chunks_asked() -> int:
        return sum(len(a) for a in asked)

    async def more_chunks_asked_than(n: int) -> None:
        await until(lambda: chunks_asked() > n)

    async def more_requests_than(n: int) -> None:
        await until(lambda: len(asked) > n)

    async def scenario() -> ShardFetcher:
        fetcher = ShardFetcher(
            "d", BlobStore(tmp_path / "c"), tmp_path / "p", Recorder(), chunks_per_request=4
        )
        task = asyncio.create_task(fetcher.fetch_blobs([ref]))

        def deliver(i: int) -> None:
            fetcher.on_chunk(ref.digest, i, data[i * CHUNK : (i + 1) * CHUNK])

        sent = 0
        while sent < ref.chunk_count:
            await more_chunks_asked_than(sent)
            # Half of what is in flight arrives; the rest of it only after the next request.
            in_flight = [i for a in asked for i in a][sent:]
            half = max(1, len(in_flight) // 2)
            for i in in_flight[:half]:
                deliver(i)
            sent += half
            if chunks_asked() < ref.chunk_count:
                await more_requests_than(len(asked))
            for i in in_flight[half:]:
                deliver(i)
            sent += len(in_flight) - half
        await task
        return fetcher

    fetcher = asyncio.run(scenario())
    assert fetcher.cache.read(ref.digest) == data
    assert asked[0] == [0, 1, 2, 3]
    flat = [i for a in asked for i in a]
    assert sorted(flat) == list(range(12)), "every chunk asked for exactly once"
    assert max(len(a) for a in asked) <= 4


def test_a_cancel_that_lands_as_a_chunk_does_ends_the_fetch(tmp_path: Path) -> None:
    """A newer revision cancels the download in progress (the reconciler's supersede): a cancel
    delivered in the same loop turn as a landed chunk's wake-up must still end the fetch. With
    asyncio.wait_for on Python 3.11 it was swallowed, and the superseded download went on until
    it stalled out (tests/test_trust.py: 22 s instead of < 10)."""
    data = random.Random(4).randbytes(6 * CHUNK)
    ref = describe_bytes(data, CHUNK)
    asked = asyncio.Event()

    class Silent:
        async def subscribe_blob(self, digest: str) -> None: ...
        async def unsubscribe_blob(self, digest: str) -> None: ...
        async def send_fetch(self, request: FetchRequest) -> None:
            asked.set()

    async def scenario() -> None:
        fetcher = ShardFetcher("d", BlobStore(tmp_path / "c"), tmp_path / "p", Silent(), request_timeout_s=30)
        task = asyncio.create_task(fetcher.fetch_blobs([ref]))
        await asked.wait()
        await asyncio.sleep(0.05)  # the fetch waits for chunks now
        fetcher._active[ref.digest].changed.set()  # a chunk's verdict wakes it ...
        task.cancel()  # ... as the cancel arrives
        done, _ = await asyncio.wait([task], timeout=5)
        assert done and task.cancelled(), "the cancel was lost: the fetch went on"

    asyncio.run(scenario())


def test_the_blob_server_refuses_chunk_indexes_past_the_end_and_rereads_the_registry(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from cloud.mqtt.blob_server import RegistryOffer
    from shared.messages import BlobRequest

    store = BlobStore(tmp_path / "cloud")
    data, cuts = _tensor_file(SIZES)
    store.put_bytes(bytes(data))
    fixed, cut = describe_bytes(bytes(data), CHUNK), describe_bytes(bytes(data), CHUNK, cuts)
    listed = [fixed]
    registry = SimpleNamespace(
        list=lambda: [
            SimpleNamespace(digest="sha256:" + "e" * 64, manifest=SimpleNamespace(blobs=lambda: list(listed)))
        ]
    )
    offer = RegistryOffer(registry, refresh_s=0.0)  # type: ignore[arg-type]
    server = BlobServer(store, Topics("t"), offered=offer)
    beyond = BlobRequest(digest=fixed.digest, chunk_size=CHUNK, chunks=[0, fixed.chunk_count])
    assert "past its last chunk" in str(server._parts(beyond, offer(fixed.digest)))
    by_range = BlobRequest(
        digest=cut.digest, chunk_size=CHUNK, ranges=[(cut.chunk_offset(3), cut.chunk_length(3))]
    )
    assert isinstance(server._parts(by_range, offer(cut.digest)), str), (
        "only the fixed chunking is listed yet"
    )
    listed.append(cut)  # a package published since lists the blob cut at its tensors
    assert offer(cut.digest) == offer(cut.digest, again=False), (
        "a known digest is not re-read on every request"
    )
    assert isinstance(server._parts(by_range, offer(cut.digest, again=True)), list)


class _SlowBroker:
    """The publish seam of aiomqtt.Client: each QoS 1 publish returns when the test lets its PUBACK in."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.topics: list[str] = []
        self.acks: list[asyncio.Event] = []
        self.fail_at = fail_at

    async def publish(self, topic: str, payload: bytes, qos: int = 0) -> None:
        import aiomqtt

        self.topics.append(topic)
        ack = asyncio.Event()
        self.acks.append(ack)
        if self.fail_at is not None and len(self.topics) > self.fail_at:
            raise aiomqtt.MqttError("The client is not currently connected.")
        await ack.wait()


async def _ack_until_done(broker: _SlowBroker, drain: asyncio.Task[None]) -> None:
    """Let every PUBACK in, as publishes come, until the drain ends."""
    while not drain.done():
        for ack in broker.acks:
            ack.set()
        await asyncio.sleep(0.005)
    await drain


def test_the_blob_server_keeps_several_publishes_in_flight_in_request_order(tmp_path: Path) -> None:
    """A QoS 1 publish waits for the broker's PUBACK: one at a time, each chunk cost a disk read
    and a round trip in turn (bench/RESULTS.md, shard_push.py)."""
    asyncio.run(_publishes_in_flight(tmp_path))


async def _publishes_in_flight(tmp_path: Path) -> None:
    from cloud.mqtt import blob_server

    store = BlobStore(tmp_path / "store")
    data = random.Random(7).randbytes(10 * CHUNK)
    digest = store.put_bytes(data)
    server = BlobServer(store, Topics("t1"))
    keys = [("chunk", digest, CHUNK, i) for i in range(10)]
    server._pending = dict.fromkeys(keys)
    broker = _SlowBroker()
    drain = asyncio.create_task(server._publish_pending(broker))  # type: ignore[arg-type]
    for _ in range(200):
        await asyncio.sleep(0.005)
        if len(broker.topics) >= blob_server.PUBLISH_WINDOW:
            break
    await asyncio.sleep(0.05)
    # A full window out, none acknowledged, nothing beyond it.
    assert len(broker.topics) == blob_server.PUBLISH_WINDOW > 1
    assert server.chunks_published == 0
    await _ack_until_done(broker, drain)
    assert broker.topics == [Topics("t1").blob_chunk(digest, i) for i in range(10)]
    assert server.chunks_published == 10 and server.bytes_published == len(data)

    # A request that arrives while the last publishes wait for their PUBACK joins this drain:
    # the request handler starts no second one while it runs, so it must not be left behind.
    server._pending = dict.fromkeys(keys[:2])
    broker = _SlowBroker()
    drain = asyncio.create_task(server._publish_pending(broker))  # type: ignore[arg-type]
    for _ in range(400):
        if len(broker.topics) == 2:
            break
        await asyncio.sleep(0.005)
    assert not server._pending and len(broker.topics) == 2
    server._pending[keys[5]] = None
    await _ack_until_done(broker, drain)
    assert broker.topics == [Topics("t1").blob_chunk(digest, i) for i in (0, 1, 5)]

    # The broker gone mid-drain: what is pending is dropped (devices ask again), nothing raised.
    server._pending = dict.fromkeys(keys)
    broker = _SlowBroker(fail_at=2)
    drain = asyncio.create_task(server._publish_pending(broker))  # type: ignore[arg-type]
    await _ack_until_done(broker, drain)
    assert server._pending == {}


def test_a_stopped_session_cancels_the_blob_publisher_quietly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The link's session ends while chunks are still going out (the control plane stopping, or
    its session lost): the publisher stops with it, drops what is pending (the devices ask again)
    and does not report a stop as a lost broker."""
    asyncio.run(_detached_mid_drain(tmp_path, caplog))


async def _detached_mid_drain(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = BlobStore(tmp_path / "store")
    digest = store.put_bytes(random.Random(3).randbytes(10 * CHUNK))
    server = BlobServer(store, Topics("t2"))
    server._pending = dict.fromkeys(("chunk", digest, CHUNK, i) for i in range(10))
    broker = _SlowBroker()  # no PUBACK ever comes: publishes stay in flight
    drain = server._drain = asyncio.create_task(server._publish_pending(broker))  # type: ignore[arg-type]
    for _ in range(200):
        if broker.topics:
            break
        await asyncio.sleep(0.005)
    assert broker.topics and server._pending
    with caplog.at_level(logging.WARNING, logger="cloud.mqtt.blob_server"):
        server.detach()
        await asyncio.gather(drain, return_exceptions=True)
    assert drain.cancelled()
    assert server._pending == {} and server._drain is None
    assert server.chunks_published == 0
    assert not [r for r in caplog.records if "lost the broker" in r.getMessage()]
