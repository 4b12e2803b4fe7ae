"""Attacks on the control channel that are refused (issue 12, the parts built so far): a device
cannot speak for another device, and no revision can pin a device beyond int64."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from cloud.registry import ModelRegistry, RegistryEntry
from shared.errors import ImpersonationError
from shared.messages import MAX_REVISION, DesiredState, DeviceStatus, Phase, ReportedState, from_device
from shared.mqtt import BrokerSettings
from shared.signing import SigningKey
from shared.topics import Topics
from tests.conftest import DEVICE, CloudSide, EdgeProcess, wait_dropped
from tests.services import eventually, start_cloud


def test_a_payload_naming_another_device_is_refused() -> None:
    topic = "autoglm/v1/t/devices/dev-a/reported"
    mine = ReportedState(device_id="dev-a", revision=1, phase=Phase.ACTIVE).to_json()
    assert from_device(ReportedState, mine, "dev-a", topic).device_id == "dev-a"
    theirs = ReportedState(device_id="dev-b", revision=1, phase=Phase.FAILED).to_json()
    with pytest.raises(ImpersonationError, match="names device 'dev-b' on the topic of 'dev-a'"):
        from_device(ReportedState, theirs, "dev-a", topic)


@pytest.mark.slow
def test_a_device_cannot_report_state_or_presence_for_another(
    tmp_path: Path, broker_settings: BrokerSettings, tenant: str, registry: ModelRegistry
) -> None:
    """The control plane takes a device's identity from the topic: dev-evil publishing on its own
    topics a failed state and an offline status that name dev-victim changes nothing of the victim."""
    cloud = start_cloud(
        tmp_path / "cloud", f"sqlite:///{tmp_path / 'cp.sqlite3'}", broker_settings, tenant, registry
    )
    t = Topics(tenant)
    side = CloudSide(broker_settings, tenant, registry)
    try:
        side.publish_raw(
            [
                (t.status("dev-victim"), DeviceStatus(device_id="dev-victim", state="online").to_json()),
                (
                    t.reported("dev-victim"),
                    ReportedState(device_id="dev-victim", revision=3, phase=Phase.ACTIVE).to_json(),
                ),
            ]
        )
        cloud.wait(lambda: cloud.devices().get("dev-victim", {}).get("phase") == "active", 30, "the victim")
        forged_state = ReportedState(device_id="dev-victim", revision=3, phase=Phase.FAILED)
        side.publish_raw(
            [
                (t.reported("dev-evil"), forged_state.to_json()),
                (t.status("dev-evil"), DeviceStatus(device_id="dev-victim", state="offline").to_json()),
                # Sent last by the same client: once it is in, the forged ones were processed.
                (t.status("dev-evil"), DeviceStatus(device_id="dev-evil", state="online").to_json()),
            ]
        )
        cloud.wait(lambda: "dev-evil" in cloud.devices(), 30, "the attacker's own status")
        victim = cloud.devices()["dev-victim"]
        assert (victim["status"], victim["phase"], victim["reported_revision"]) == ("online", "active", 3)
        log = "\n".join(cloud.lines)
        assert log.count("names device 'dev-victim' on the topic of 'dev-evil'") == 2, log[-3000:]
    finally:
        cloud.stop()


@pytest.mark.slow
def test_a_revision_beyond_int64_cannot_pin_a_device(
    demo_package: RegistryEntry,
    edge_factory: Callable[..., EdgeProcess],
    broker_settings: BrokerSettings,
    tenant: str,
    registry: ModelRegistry,
    signing_key: SigningKey,
) -> None:
    edge = edge_factory(
        device_id=DEVICE, tenant=tenant, broker=broker_settings, trusted=[signing_key.public.b64]
    )
    edge.wait_http("/healthz", 60)
    cloud = CloudSide(broker_settings, tenant, registry)
    eventually(lambda: httpx.get(f"{edge.api}/v1/agent", timeout=5).json()["online"], 30, "the agent online")
    before = httpx.get(f"{edge.api}/v1/agent", timeout=5).json()["dropped_messages"]
    pinned = json.loads(DesiredState(revision=1, model=demo_package.ref).to_json())
    for revision in (10**30, MAX_REVISION + 1):
        cloud.publish_raw(
            [(cloud.topics.desired(DEVICE), json.dumps({**pinned, "revision": revision}).encode())]
        )
    assert wait_dropped(edge, before + 2) == before + 2
    # A later legitimate revision is applied as usual, and reported within int64.
    reported = cloud.drive(
        DesiredState(revision=1, model=demo_package.ref), lambda r: r.phase == Phase.ACTIVE
    )
    assert reported.revision == 1
    assert "less than or equal to 9223372036854775807" in edge.log_text()


BAD_ROLLOUTS = [
    ({"wave_timeout_s": 1e308}, "wave_timeout_s at most"),
    ({"health_window_s": float("nan")}, "health_window_s must be a finite number"),
    ({"wave_timeout_s": float("inf")}, "wave_timeout_s must be a finite number"),
    ({"max_latency_ratio": float("inf")}, "max_latency_ratio must be a finite number"),
    ({"max_concurrent": 10**30}, "max_concurrent is at most"),
    ({"waves": [10.0, float("nan"), 100.0]}, "finite percentage"),
]


def test_rollout_parameters_are_bounded_and_finite() -> None:
    from cloud.plane.rollouts import RolloutSpec
    from shared.errors import ContractError
    from shared.messages import ModelRef

    ref = ModelRef(name="m", version="1", manifest_digest="sha256:" + "b" * 64, manifest_size=10)
    RolloutSpec(model=ref).validate()
    for fields, message in BAD_ROLLOUTS:
        if "waves" in fields:
            fields = {"waves": tuple(fields["waves"])}
        with pytest.raises(ContractError, match=message):
            RolloutSpec(model=ref, **fields).validate()  # type: ignore[arg-type]


def test_one_failing_rollout_does_not_stop_the_others() -> None:
    from cloud.plane.fleet import DesiredRecord
    from cloud.plane.rollouts import RolloutDriver

    class Driver(RolloutDriver):
        def _lease(self, rid: str) -> bool:
            return True

        def _drive(self, tenant: str, rid: str) -> list[DesiredRecord]:
            if tenant == "broken":
                raise OverflowError("cannot convert float infinity to integer")
            return [DesiredRecord(tenant, f"dev-{rid}", 1, None, {})]

    driver = Driver(engine=None, fleet=None, owner="replica-a")  # type: ignore[arg-type]
    out = [
        p
        for rid, tenant in [("r1", "broken"), ("r2", "ok"), ("r3", "ok")]
        for p in driver._drive_isolated(tenant, rid)
    ]
    assert [p.device_id for p in out] == ["dev-r2", "dev-r3"]
    assert driver.failures == 1


@pytest.mark.slow
def test_the_control_plane_answers_400_to_unbounded_rollouts(
    tmp_path: Path,
    broker_settings: BrokerSettings,
    tenant: str,
    registry: ModelRegistry,
    demo_package: RegistryEntry,
) -> None:
    cloud = start_cloud(
        tmp_path / "cloud", f"sqlite:///{tmp_path / 'cp.sqlite3'}", broker_settings, tenant, registry
    )
    try:
        model = f"{demo_package.name}:{demo_package.version}"
        for fields, message in BAD_ROLLOUTS:
            # JSON has no NaN or Infinity, but Python's parser (and so FastAPI's) takes them.
            body = json.dumps({"model": model, **fields})
            r = httpx.post(
                f"{cloud.url}/v1/rollouts",
                content=body,
                headers={"authorization": f"Bearer {cloud.key}", "content-type": "application/json"},
                timeout=30,
            )
            assert r.status_code == 400, (fields, r.status_code, r.text)
            assert message in r.json()["error"]["message"], (fields, r.text)
        assert cloud.api("GET", "/healthz").status_code == 200
    finally:
        cloud.stop()


@pytest.mark.slow
def test_the_blob_server_publishes_only_registry_blobs_in_registry_chunks_within_a_budget(
    broker_settings: BrokerSettings, tenant: str, registry: ModelRegistry, demo_package_v2: RegistryEntry
) -> None:
    import asyncio
    import uuid

    from cloud.mqtt.blob_server import BlobServer, RegistryOffer
    from cloud.ratelimit import TokenBuckets
    from shared.messages import BlobRequest, FetchRequest
    from shared.mqtt import make_client

    t = Topics(tenant)
    big = max(demo_package_v2.manifest.blobs(), key=lambda b: b.size)
    assert big.chunk_size == 64 * 1024 and big.chunk_count > 32 and big.cut  # cut at its tensors
    stray = registry.blobs.put_bytes(b"in the store, in no manifest of this tenant" * 100)
    every_chunk = [(big.chunk_offset(i), big.chunk_length(i)) for i in range(big.chunk_count)]

    def fetch(
        digest: str,
        chunk_size: int,
        chunks: list[int] | None = None,
        ranges: list[tuple[int, int]] | None = None,
    ) -> bytes:
        blob = BlobRequest(digest=digest, chunk_size=chunk_size, chunks=chunks, ranges=ranges)
        return FetchRequest(device_id="dev-greedy", request_id=uuid.uuid4().hex[:16], blobs=[blob]).to_json()

    async def go() -> BlobServer:
        budget = TokenBuckets(rate_per_s=64 * 1024, burst=1024 * 1024)  # 1 MiB at once, 64 KiB/s
        server = BlobServer(registry.blobs, t, offered=RegistryOffer(registry), device_budget=budget)
        async with make_client(broker_settings, f"cloud-{uuid.uuid4().hex[:8]}", persistent=False) as client:
            topic = t.fetch("dev-greedy")
            await server.handle(client, topic, fetch(stray, 4096, [0]))
            # Pieces that fit no listed layout: fixed chunks of a blob listed cut at its tensors,
            # one-byte ranges, and a range across the whole blob.
            await server.handle(client, topic, fetch(big.digest, big.chunk_size, list(range(64))))
            await server.handle(
                client, topic, fetch(big.digest, big.chunk_size, ranges=[(i, 1) for i in range(64)])
            )
            await server.handle(client, topic, fetch(big.digest, big.chunk_size, ranges=[(0, big.size)]))
            assert server.chunks_published == 0 and server._pending == {}
            for _ in range(10):  # the same big blob, over and over
                await server.handle(client, topic, fetch(big.digest, big.chunk_size, ranges=every_chunk))
            if server._drain is not None:
                await server._drain
        return server

    server = asyncio.run(go())
    # 1 MiB of budget (plus what refilled meanwhile), not 10 × the blob.
    assert server.bytes_published <= 1024 * 1024 + 2 * big.chunk_size, server.bytes_published
    assert server.bytes_published >= 1024 * 1024 - big.chunk_size
    # The stray blob, the 64 fixed chunks, the 64 one-byte ranges, the whole-blob range, and each
    # request's chunks beyond the budget.
    within = sum(1 for _, n in every_chunk[: server.chunks_published])
    assert server.chunks_refused >= 1 + 64 + 64 + 1 + 10 * (big.chunk_count - within - 1), (
        server.chunks_refused
    )


def _unservable_package(
    base: RegistryEntry, registry: ModelRegistry, signing_key: SigningKey
) -> RegistryEntry:
    """Properly signed and listed, but its graph blob is in no store: it can never arrive."""
    from shared.blobs import describe_bytes
    from shared.manifest import SignedManifest

    if registry.exists(base.name, "unservable"):
        return registry.get(base.name, "unservable")
    lost = b"lost from the store " * 10_000
    files = []
    for f in base.manifest.files:
        if f.role == "graph":
            f = f.model_copy(update={"blob": describe_bytes(lost, f.blob.chunk_size)})
        files.append(f)
    manifest = base.manifest.model_copy(update={"version": "unservable", "files": files})
    digest = registry.blobs.put_bytes(lost)
    entry = registry.publish(SignedManifest.sign(manifest, signing_key))
    registry.blobs.path(digest).unlink()  # the blob server can never read it now
    return entry


@pytest.mark.slow
def test_a_chunk_that_always_arrives_damaged_fails_the_update_and_a_newer_revision_is_not_held_back(
    broker_settings: BrokerSettings,
    tenant: str,
    registry: ModelRegistry,
    signing_key: SigningKey,
    demo_package: RegistryEntry,
    demo_package_v2: RegistryEntry,
    edge_factory: Callable[..., EdgeProcess],
) -> None:
    from tests.conftest import BackgroundCloud, is_active

    device = "storm-1"
    edge = edge_factory(
        device_id=device, tenant=tenant, broker=broker_settings, trusted=[signing_key.public.b64]
    )
    graph = max(demo_package_v2.manifest.blobs(), key=lambda b: b.size)  # the weights, many chunks
    assert graph.chunk_count > 2
    # A chunk v2 does not share with v1 (shared ones are copied from the other slot, not fetched).
    in_v1 = {h for b in demo_package.manifest.blobs() for h in b.chunks}
    victim = next(i for i, h in enumerate(graph.chunks) if h not in in_v1)
    second = graph.chunk_offset(victim)
    with BackgroundCloud(broker_settings, tenant, registry) as cloud:

        def always_damaged(digest: str, offset: int, data: bytes) -> bytes:
            # That chunk of the weights, alone or inside a run of chunks, always arrives zeroed.
            cloud.served.append((digest, offset, len(data)))
            if digest == graph.digest and offset <= second < offset + len(data):
                at = second - offset
                return (
                    data[:at] + b"\0" * graph.chunk_length(victim) + data[at + graph.chunk_length(victim) :]
                )
            return data

        cloud.link.blob_server.chunk_filter = always_damaged
        cloud.set_desired(device, DesiredState(revision=1, model=demo_package.ref))
        cloud.wait_reported(device, is_active(demo_package, 1))

        cloud.set_desired(device, DesiredState(revision=2, model=demo_package_v2.ref))
        failed = cloud.wait_reported(device, lambda r: r.phase == Phase.FAILED, timeout=60)
        assert failed.last_error is not None and failed.last_error.code == "integrity_error"
        assert "arrived damaged 5 times" in failed.last_error.message
        # Not a storm: bounded re-requests of the damaged chunk.
        assert sum(1 for d, at, n in cloud.served if d == graph.digest and at <= second < at + n) <= 6
        assert failed.slots[failed.active_slot or "a"] == demo_package.ref  # still serving v1

        # A model whose blob never arrives is being fetched; a newer revision does not wait for
        # the fetch to give up (10 stalls of 2 s here) but cancels it.
        stuck = _unservable_package(demo_package_v2, registry, signing_key)
        cloud.set_desired(device, DesiredState(revision=3, model=stuck.ref))
        cloud.wait_reported(
            device, lambda r: r.phase == Phase.FETCHING and r.target_revision == 3, timeout=30
        )
        started = time.monotonic()
        cloud.set_desired(device, DesiredState(revision=4, model=demo_package.ref))
        back = cloud.wait_reported(device, lambda r: r.revision == 4 and r.phase == Phase.ACTIVE, timeout=30)
        assert time.monotonic() - started < 10, edge.log_text()[-3000:]
        assert back.slots[back.active_slot or "a"] == demo_package.ref
        assert "supersedes the download for revision 3" in edge.log_text()


def test_a_request_for_many_unknown_blobs_is_judged_in_one_hop_and_one_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device's flood of fetch requests for digests the registry does not list held the MQTT
    session every tenant shares for seconds: four thread hops and a warning per blob."""
    import asyncio
    import hashlib
    from typing import Any

    from cloud.mqtt.blob_server import BlobServer, RegistryOffer
    from shared.messages import BlobRequest, FetchRequest

    registry = ModelRegistry(tmp_path / "reg")
    topics = Topics("acme")
    server = BlobServer(registry.blobs, topics, offered=RegistryOffer(registry))
    digests = [f"sha256:{hashlib.sha256(str(i).encode()).hexdigest()}" for i in range(64)]
    request = FetchRequest(
        device_id="dev-1",
        request_id="req-1",
        blobs=[BlobRequest(digest=d, chunk_size=4096, chunks=[0, 1]) for d in digests],
    )
    hops: list[Any] = []
    to_thread = asyncio.to_thread

    async def counted(fn: Any, *args: Any, **kwargs: Any) -> Any:
        hops.append(fn)
        return await to_thread(fn, *args, **kwargs)

    async def go() -> None:
        await server.handle(None, topics.fetch("dev-1"), request.to_json())  # type: ignore[arg-type]

    monkeypatch.setattr(asyncio, "to_thread", counted)
    with caplog.at_level("WARNING", logger="cloud.mqtt.blob_server"):
        asyncio.run(go())
    assert len(hops) == 1 and server.chunks_refused == 128 and server.chunks_published == 0
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1 and "refused 64 blob(s) to dev-1" in refusals[0].getMessage()
