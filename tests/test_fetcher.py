"""ShardFetcher against real mosquitto and the real BlobServer."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cloud.mqtt.blob_server import BlobServer
from cloud.mqtt.control_link import ControlLink
from edge_agent.update.fetcher import ShardFetcher, chunk_index
from edge_agent.uplink.link import CloudLink
from shared.blobs import BlobRef, BlobStore, describe_bytes
from shared.errors import FetchError
from shared.mqtt import BrokerSettings
from shared.topics import Topics

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

    link = CloudLink(broker, topics, "dev-1", on_desired=lambda _d: None, on_chunk=on_chunk)
    fetcher = ShardFetcher("dev-1", BlobStore(tmp / "cache"), tmp / "partial", link, **fetch_kw)  # type: ignore[arg-type]
    tasks = [asyncio.create_task(cloud.run()), asyncio.create_task(link.run())]
    try:
        await asyncio.wait_for(asyncio.gather(cloud.connected.wait(), link.connected.wait()), 10)
        yield fetcher
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


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

    def corrupt_chunk_3_once(digest: str, index: int, chunk: bytes) -> bytes:
        if index == 3 and not corrupted:
            corrupted.append(index)
            return chunk[:-1] + bytes([chunk[-1] ^ 0xFF])
        return chunk

    server = BlobServer(store, Topics(tenant), chunk_filter=corrupt_chunk_3_once)

    async def scenario() -> ShardFetcher:
        async with _wired(broker_settings, tenant, tmp_path, store, server, chunks_per_request=64) as fetcher:
            await asyncio.wait_for(fetcher.fetch_blobs([ref]), 30)
            return fetcher

    fetcher = asyncio.run(scenario())
    assert corrupted == [3]
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

    async def scenario() -> ShardFetcher:
        async with _wired(broker_settings, tenant, tmp_path, store, server) as fetcher:
            await asyncio.wait_for(fetcher.fetch_blobs([ref]), 30)
            return fetcher

    fetcher = asyncio.run(scenario())
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

    async def scenario() -> ShardFetcher:
        async with _wired(broker_settings, tenant, tmp_path, store, server) as fetcher:
            reuse = chunk_index([(local, old_ref)])
            await asyncio.wait_for(fetcher.fetch_blobs([new_ref], reuse), 30)
            return fetcher

    fetcher = asyncio.run(scenario())
    assert fetcher.cache.read(new_ref.digest) == bytes(new)
    assert sorted(i for _, i in fetcher.stats.requested) == [2, 11]
    assert fetcher.stats.chunks_reused == 19
    assert server.chunks_published == 2
