"""Model distribution over MQTT: a 128 MiB model to 1, 10 and 50 devices, and a delta update.

Everything is the real code path: the cloud's BlobServer (requests coalesced: a chunk several
devices ask for at once is published once on its shared blob topic) and, per device, the edge
agent's CloudLink (its own persistent MQTT session) and ShardFetcher (per-chunk SHA-256
verification, written to a partial file, whole-blob digest check). Beside it, in the same run,
a raw stream through the same broker: one publisher sends the same chunks as QoS 1 messages to
N subscribers that only count bytes — the ceiling for MQTT on this machine.

Then a second version with 10 % of the weights changed (whole tensors, as a fine-tune of some
layers would change them) goes to a device that holds the first one: bytes sent on the wire vs
the bytes that changed, at 1 MiB and at 64 KiB chunks.

Usage: python bench/shard_push.py [--size-mib 128] [--devices 1,10,50]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud.mqtt.blob_server import BlobServer
from cloud.mqtt.control_link import ControlLink
from cloud.mqtt.local_broker import LocalBroker
from edge_agent.update.fetcher import ShardFetcher, chunk_index
from edge_agent.uplink.link import CloudLink
from shared.blobs import BlobRef, BlobStore, describe_file
from shared.mqtt import QOS, BrokerSettings, make_client
from shared.topics import Topics

MIB = 1024 * 1024
TENSORS = 100


def make_weights(path: Path, size: int, seed: int) -> None:
    rng = random.Random(seed)
    with path.open("wb") as fh:
        left = size
        while left:
            n = min(left, 4 * MIB)
            fh.write(rng.randbytes(n))
            left -= n


def change_tensors(src: Path, dst: Path, fraction: float) -> int:
    """Copy ``src`` with ``fraction`` of its TENSORS equal slices rewritten; returns bytes changed."""
    data = bytearray(src.read_bytes())
    size = len(data) // TENSORS
    rng = random.Random(1)
    changed = 0
    for t in rng.sample(range(TENSORS), int(TENSORS * fraction)):
        data[t * size : (t + 1) * size] = rng.randbytes(size)
        changed += size
    dst.write_bytes(bytes(data))
    return changed


class Device:
    def __init__(self, i: int, broker: BrokerSettings, topics: Topics, root: Path) -> None:
        self.fetcher: ShardFetcher | None = None
        self.link = CloudLink(
            broker, topics, f"bench-{i:03d}", on_desired=lambda _d: None, on_chunk=self._chunk
        )
        self.fetcher = ShardFetcher(
            f"bench-{i:03d}",
            BlobStore(root / f"dev{i}" / "cache"),
            root / f"dev{i}" / "partial",
            self.link,
            chunks_per_request=64,
        )

    # Seconds the device's event loop spent handing chunks to the fetcher: time in which the
    # agent could not answer its API or read the next message.
    loop_s = 0.0

    def _chunk(self, digest: str, index: int, data: bytes) -> None:
        assert self.fetcher is not None
        t0 = time.perf_counter()
        self.fetcher.on_chunk(digest, index, data)
        self.loop_s += time.perf_counter() - t0


async def push(
    broker: BrokerSettings, store: BlobStore, ref: BlobRef, n: int, root: Path
) -> tuple[float, int, float]:
    """(seconds for all n devices to hold the verified blob, chunk publishes by the cloud, the
    most seconds one device's event loop spent in on_chunk)."""
    topics = Topics(f"push{n}")
    server = BlobServer(store, topics)
    cloud = ControlLink(broker, topics, server, client_id=f"cloud-push-{n}")
    devices = [Device(i, broker, topics, root / f"push{n}") for i in range(n)]
    tasks = [asyncio.create_task(cloud.run())] + [asyncio.create_task(d.link.run()) for d in devices]
    try:
        await asyncio.gather(cloud.connected.wait(), *(d.link.connected.wait() for d in devices))
        t0 = time.perf_counter()
        await asyncio.gather(*(d.fetcher.fetch_blobs([ref]) for d in devices if d.fetcher))
        return time.perf_counter() - t0, server.chunks_published, max(d.loop_s for d in devices)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def raw_stream(broker: BrokerSettings, path: Path, n: int, chunk: int) -> float:
    """One publisher, n counting subscribers, the file's bytes as QoS 1 messages."""
    total = path.stat().st_size  # noqa: ASYNC240 (one stat before the clock starts)
    topic = f"raw/{n}/chunks"
    done = asyncio.Event()
    got = [0] * n

    async def subscriber(i: int, ready: asyncio.Event) -> None:
        async with make_client(broker, f"raw-sub-{n}-{i}", persistent=False) as c:
            await c.subscribe(topic, qos=QOS)
            ready.set()
            async for m in c.messages:
                got[i] += len(m.payload) if isinstance(m.payload, bytes) else 0
                if all(g >= total for g in got):
                    done.set()

    readies = [asyncio.Event() for _ in range(n)]
    subs = [asyncio.create_task(subscriber(i, readies[i])) for i in range(n)]
    await asyncio.gather(*(r.wait() for r in readies))
    async with make_client(broker, f"raw-pub-{n}", persistent=False) as pub:
        t0 = time.perf_counter()
        with path.open("rb") as fh:
            while data := fh.read(chunk):
                await pub.publish(topic, data, qos=QOS)
        await done.wait()
        elapsed = time.perf_counter() - t0
    for s in subs:
        s.cancel()
    await asyncio.gather(*subs, return_exceptions=True)
    return elapsed


async def delta(
    broker: BrokerSettings, store: BlobStore, old: Path, new: Path, chunk: int, root: Path
) -> tuple[int, int]:
    """(bytes the cloud published, bytes the device copied locally) for old → new."""
    old_ref, new_ref = describe_file(old, chunk), describe_file(new, chunk)
    store.put_file(new)
    topics = Topics(f"delta{chunk}")
    server = BlobServer(store, topics)
    cloud = ControlLink(broker, topics, server, client_id=f"cloud-delta-{chunk}")
    dev = Device(chunk, broker, topics, root / f"delta{chunk}")
    tasks = [asyncio.create_task(cloud.run()), asyncio.create_task(dev.link.run())]
    try:
        await asyncio.gather(cloud.connected.wait(), dev.link.connected.wait())
        assert dev.fetcher is not None
        await dev.fetcher.fetch_blobs([new_ref], chunk_index([(old, old_ref)]))
        return server.bytes_published, dev.fetcher.stats.bytes_reused
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=128)
    ap.add_argument("--devices", default="1,10,50")
    args = ap.parse_args()
    counts = [int(c) for c in args.devices.split(",")]

    work = Path(tempfile.mkdtemp(prefix="autoglm-shard-bench-"))
    size = args.size_mib * MIB
    v1, v2 = work / "v1.bin", work / "v2.bin"
    print(f"writing a {args.size_mib} MiB model …", flush=True)
    make_weights(v1, size, seed=0)
    changed = change_tensors(v1, v2, 0.10)
    store = BlobStore(work / "cloud")
    store.put_file(v1)
    ref = describe_file(v1, MIB)
    (work / "mosquitto").mkdir()
    rows = []
    with LocalBroker(workdir=work / "mosquitto") as b:
        broker = BrokerSettings(host=b.host, port=b.port)
        for n in counts:
            print(f"pushing to {n} device(s) …", flush=True)
            ours, published, loop_s = asyncio.run(push(broker, store, ref, n, work))
            raw = asyncio.run(raw_stream(broker, v1, n, MIB))
            rows.append((n, ours, published, raw, loop_s))
        deltas = []
        for chunk in (MIB, 64 * 1024):
            print(f"delta update at {chunk // 1024} KiB chunks …", flush=True)
            sent, reused = asyncio.run(delta(broker, store, v1, v2, chunk, work))
            deltas.append((chunk, sent, reused))

    print()
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cpus; python {platform.python_version()}; mosquitto on loopback"
    )
    print(
        f"model: {args.size_mib} MiB in 1 MiB chunks, QoS 1; devices and cloud in one process, one MQTT session each"
    )
    print()
    print(
        f"{'devices':>8}{'ours s':>9}{'ours MiB/s':>12}{'raw s':>8}{'raw MiB/s':>11}{'ours/raw':>10}"
        f"{'chunk publishes':>17}{'loop ms':>9}"
    )
    for n, ours, published, raw, loop_s in rows:
        delivered = n * size / MIB
        print(
            f"{n:>8}{ours:>9.1f}{delivered / ours:>12.0f}{raw:>8.1f}{delivered / raw:>11.0f}"
            f"{raw / ours:>10.2f}{published:>12} ({published / ref.chunk_count:.2f}×){loop_s * 1000:>9.0f}"
        )
    print(
        "MiB/s = bytes delivered to all devices together per second; chunk publishes vs chunks in the model;"
        "\nloop ms = the most one device's event loop spent taking its chunks (it serves the local API too)"
    )
    print()
    print(
        f"delta update, 10% of the weights changed in {TENSORS // 10} whole tensors ({changed / MIB:.1f} MiB):"
    )
    for chunk, sent, reused in deltas:
        print(
            f"  {chunk // 1024:>5} KiB chunks: sent {sent / MIB:6.1f} MiB = {sent / changed:.2f}× the changed bytes "
            f"(goal ≤ 1.1×); {reused / MIB:.1f} MiB reused from the old version on the device"
        )


if __name__ == "__main__":
    main()
