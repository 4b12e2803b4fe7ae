"""Crash-safe updates against real mosquitto and real agent processes: SIGKILL at every phase,
a broker stopped mid-transfer, a model that cannot load, rollback, config push, the bounded queue."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from cloud.mqtt.local_broker import LocalBroker
from cloud.registry import ModelRegistry, RegistryEntry
from edge_agent.update.fetcher import MANIFEST_CHUNK_SIZE
from shared.messages import DesiredState, Phase
from shared.mqtt import BrokerSettings
from shared.signing import SigningKey
from tests.conftest import BackgroundCloud, EdgeProcess, is_active
from tests.services import eventually

Start = Callable[..., EdgeProcess]


def served_model(edge: EdgeProcess) -> str:
    r = httpx.post(
        f"{edge.api}/v1/completions",
        json={"model": "default", "prompt": "x = ", "max_tokens": 1, "temperature": 0},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    model: str = r.json()["model"]
    return model


def agent_info(edge: EdgeProcess) -> dict[str, Any]:
    info: dict[str, Any] = httpx.get(f"{edge.api}/v1/agent", timeout=10).json()
    return info


def wait_until(check: Callable[[], bool], timeout: float, what: str, edge: EdgeProcess) -> None:
    eventually(check, timeout, what, context=lambda: edge.log_text()[-3000:])


def kill(edge: EdgeProcess) -> None:
    edge.proc.kill()  # SIGKILL: no shutdown code runs
    edge.proc.wait(10)


@pytest.mark.parametrize("phase", ["fetching", "verifying", "staged", "activating"])
def test_sigkill_during_an_update_converges_and_the_old_model_serves_until_the_switch(
    phase: str,
    broker_settings: BrokerSettings,
    tenant: str,
    registry: ModelRegistry,
    signing_key: SigningKey,
    demo_package: RegistryEntry,
    demo_package_v2: RegistryEntry,
    edge_factory: Start,
) -> None:
    device = f"kill-{phase}"
    common = {
        "device_id": device,
        "tenant": tenant,
        "broker": broker_settings,
        "trusted": [signing_key.public.b64],
    }
    with BackgroundCloud(broker_settings, tenant, registry) as cloud:
        edge = edge_factory(**common)
        cloud.set_desired(device, DesiredState(revision=1, model=demo_package.ref))
        cloud.wait_reported(device, is_active(demo_package, 1))
        edge.stop()

        if phase == "fetching":
            # Slow the transfer down so the kill lands in the middle of it.
            edge = edge_factory(**common, extra={"fetch": {"max_bytes_per_s": 256 * 1024}})
        else:
            edge = edge_factory(**common, env={"AUTOGLM_EDGE_FAILPOINTS": phase})
        edge.wait_ready()
        cloud.set_desired(device, DesiredState(revision=2, model=demo_package_v2.ref))
        if phase == "fetching":
            wait_until(lambda: agent_info(edge)["fetch"]["chunks_received"] >= 8, 60, "some chunks", edge)
        else:
            wait_until(lambda: f"failpoint {phase}" in edge.log_text(), 60, f"failpoint {phase}", edge)
        # Mid-update, the old model still answers.
        assert served_model(edge) == "demo-glm:1"
        kill(edge)

        edge = edge_factory(**common)
        edge.wait_ready()
        final = cloud.wait_reported(device, is_active(demo_package_v2, 2))
        assert final.last_error is None
        assert served_model(edge) == "demo-glm:2"
        # The previous model stays in the other slot for an instant rollback.
        assert set(final.slots.values()) == {demo_package.ref, demo_package_v2.ref}


def test_broker_stopped_mid_transfer_resumes_without_fetching_completed_chunks(
    private_broker: LocalBroker,
    tenant: str,
    registry: ModelRegistry,
    signing_key: SigningKey,
    demo_package_v2: RegistryEntry,
    edge_factory: Start,
) -> None:
    settings = BrokerSettings(
        host=private_broker.host, port=private_broker.port, reconnect_initial_s=0.2, reconnect_max_s=1.0
    )
    device = "resume-1"
    per_request = 4  # 256 KiB/s of 64 KiB chunks: the fetcher asks for 4 at a time
    edge = edge_factory(
        device_id=device,
        tenant=tenant,
        broker=settings,
        trusted=[signing_key.public.b64],
        extra={"fetch": {"max_bytes_per_s": 256 * 1024}},
    )
    edge.wait_http("/healthz")
    total = sum(b.chunk_count for b in demo_package_v2.manifest.blobs())
    with BackgroundCloud(settings, tenant, registry) as cloud:
        cloud.set_desired(device, DesiredState(revision=1, model=demo_package_v2.ref))
        wait_until(lambda: agent_info(edge)["fetch"]["chunks_received"] >= 12, 60, "some chunks", edge)
        private_broker.stop()
        received_before = agent_info(edge)["fetch"]["chunks_received"]
        assert 0 < received_before < total
        time.sleep(1.5)
        private_broker.start()
        cloud.wait_reported(device, is_active(demo_package_v2, 1), timeout=120)

    info = agent_info(edge)
    # Every chunk was written exactly once; what the cloud sent twice was at most what was in
    # flight when the broker went away, never a chunk the device already had.
    manifest_chunks = -(-demo_package_v2.ref.manifest_size // MANIFEST_CHUNK_SIZE)
    assert info["fetch"]["chunks_received"] == total + manifest_chunks
    blobs = demo_package_v2.manifest.blobs()
    sent = sum(n for digest, _, n in cloud.served if digest != demo_package_v2.ref.manifest_digest)
    chunk_size = max(b.chunk_size for b in blobs)
    assert sum(b.size for b in blobs) <= sent <= sum(b.size for b in blobs) + 2 * per_request * chunk_size
    assert served_model(edge) == "demo-glm:2"


def test_failed_load_rejected_config_rollback_and_queue_limit(
    broker_settings: BrokerSettings,
    tenant: str,
    registry: ModelRegistry,
    signing_key: SigningKey,
    demo_package: RegistryEntry,
    demo_package_v2: RegistryEntry,
    broken_package: RegistryEntry,
    edge_factory: Start,
) -> None:
    device = "life-1"
    edge = edge_factory(
        device_id=device, tenant=tenant, broker=broker_settings, trusted=[signing_key.public.b64]
    )
    with BackgroundCloud(broker_settings, tenant, registry) as cloud:
        cloud.set_desired(device, DesiredState(revision=1, model=demo_package.ref))
        cloud.wait_reported(device, is_active(demo_package, 1))

        # A signed, intact model that cannot load is never activated; the old one keeps serving.
        cloud.set_desired(device, DesiredState(revision=2, model=broken_package.ref))
        failed = cloud.wait_reported(device, lambda r: r.phase == Phase.FAILED)
        assert failed.last_error is not None and failed.last_error.code == "model_load_failed"
        assert failed.slots[failed.active_slot or "a"] == demo_package.ref
        assert served_model(edge) == "demo-glm:1"

        # An invalid config is refused and reported; the old one stays in force.
        bad = {"runtime": {"queue_size": -1}, "sampling": {"colour": "blue"}}
        cloud.set_desired(device, DesiredState(revision=3, model=demo_package.ref, config=bad))
        rejected = cloud.wait_reported(device, lambda r: r.config_error is not None and r.revision == 3)
        assert rejected.phase == Phase.ACTIVE and rejected.config_revision == -1
        assert rejected.config_error is not None and rejected.config_error.code == "config_rejected"
        assert "runtime.queue_size" in rejected.config_error.message
        assert "sampling.colour" in rejected.config_error.message
        assert agent_info(edge)["config"]["queue_size"] == 16

        # A valid one applies: one slot, no waiting room at all, greedy by default.
        good = {"runtime": {"queue_size": 0, "parallel": 1}, "sampling": {"temperature": 0.0}}
        cloud.set_desired(device, DesiredState(revision=4, model=demo_package.ref, config=good))
        applied = cloud.wait_reported(device, lambda r: r.config_revision == 4 and r.revision == 4)
        assert applied.config_error is None and applied.phase == Phase.ACTIVE
        config = agent_info(edge)["config"]
        assert config["queue_size"] == 0 and config["parallel"] == 1 and config["temperature"] == 0.0
        assert agent_info(edge)["queue"]["parallel"] == 1
        _second_request_gets_429(edge)

        # v2 in, then back to v1 (a rollback, so signed as one: v1 is the lower release): the
        # previous slot is switched to, nothing is downloaded.
        cloud.set_desired(device, DesiredState(revision=5, model=demo_package_v2.ref, config=good))
        cloud.wait_reported(device, is_active(demo_package_v2, 5))
        served_before = len(cloud.served)
        cloud.reports.clear()
        cloud.set_desired(
            device, DesiredState(revision=6, model=demo_package.ref, config=good, allow_downgrade=True)
        )
        back = cloud.wait_reported(device, is_active(demo_package, 6))
        assert Phase.SWITCHING in [r.phase for r in cloud.reports]
        assert Phase.FETCHING not in [r.phase for r in cloud.reports]
        assert len(cloud.served) == served_before
        assert back.slots[back.active_slot or "a"] == demo_package.ref
        assert served_model(edge) == "demo-glm:1"

        # The operator's rollback command switches slots the same way (revision unchanged).
        cloud.command(device, "rollback")
        cloud.wait_reported(device, is_active(demo_package_v2, 6))
        assert served_model(edge) == "demo-glm:2"


def _second_request_gets_429(edge: EdgeProcess) -> None:
    """With no waiting room, requests arriving while one generates are refused at once."""

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=edge.api, timeout=60) as client:
            body = {"model": "default", "prompt": "import os\n", "max_tokens": 64}
            return list(await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(4))))

    responses = asyncio.run(burst())
    statuses = sorted(r.status_code for r in responses)
    assert statuses[0] == 200 and statuses[-1] == 429, statuses
    assert set(statuses) <= {200, 429}
    refused = next(r for r in responses if r.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["code"] == "queue_full"


def test_an_update_from_a_version_chunked_the_old_way_downloads_only_the_changed_tensors(
    broker_settings: BrokerSettings,
    tenant: str,
    tmp_path: Path,
    signing_key: SigningKey,
    demo_source: Path,
    edge_factory: Start,
) -> None:
    """Version 1 was packaged with fixed chunks (before tensor boundaries existed), version 2 is
    a fine-tune of one tensor packaged with the default chunking: the pieces of every cell a
    tensor boundary cuts have hashes version 1 never listed, yet the agent copies them from its
    slot (same file, same offset) and downloads only the changed tensor."""
    import onnx
    from onnx import numpy_helper
    from safetensors.torch import load_file, save_file

    from cloud.packaging.packager import ModelPackager, PackageOptions

    tuned = tmp_path / "tuned"
    shutil.copytree(demo_source, tuned)
    state = load_file(str(tuned / "model.safetensors"))
    name = max((k for k in state if "layers" in k), key=lambda k: state[k].numel())
    state[name] = state[name] + 0.01
    save_file(state, str(tuned / "model.safetensors"), metadata={"format": "pt"})
    # A registry of its own: the same weights listed with fixed chunks in the session's registry
    # would change what other tests may fetch from it.
    registry = ModelRegistry(tmp_path / "registry")
    packager = ModelPackager(registry, signing_key)
    common = {"quantize": "none", "chunk_size": 64 * 1024, "pool_artifact": False}
    v1 = packager.package(
        demo_source, PackageOptions(name="delta-glm", version="1", chunking="fixed", **common)
    )  # type: ignore[arg-type]
    v2 = packager.package(tuned, PackageOptions(name="delta-glm", version="2", **common))  # type: ignore[arg-type]
    old = next(f.blob for f in v1.manifest.files if f.role == "weights")
    new = next(f.blob for f in v2.manifest.files if f.role == "weights")
    assert new.cut and not old.cut

    def initializers(entry: RegistryEntry) -> dict[str, bytes]:
        folder = tmp_path / f"graph-{entry.version}"
        folder.mkdir()
        for f in entry.manifest.files:
            if f.role in ("graph", "weights"):
                shutil.copyfile(registry.blobs.path(f.blob.digest), folder / f.path)
        model = onnx.load(str(folder / "model.onnx"))
        return {t.name: numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}

    a, b = initializers(v1), initializers(v2)
    changed = sum(len(data) for key, data in b.items() if a.get(key) != data)
    assert 0 < changed < new.size // 4
    # By chunk hash alone, every 64 KiB cell cut by a tensor boundary would have to be downloaded.
    unshared = sum(new.chunk_length(i) for i, h in enumerate(new.chunks) if h not in set(old.chunks))
    assert unshared > changed + 64 * 1024

    device = "delta-1"
    edge = edge_factory(
        device_id=device, tenant=tenant, broker=broker_settings, trusted=[signing_key.public.b64]
    )
    with BackgroundCloud(broker_settings, tenant, registry) as cloud:
        cloud.set_desired(device, DesiredState(revision=1, model=v1.ref))
        cloud.wait_reported(device, is_active(v1, 1))
        before = agent_info(edge)["fetch"]
        served = len(cloud.served)
        cloud.set_desired(device, DesiredState(revision=2, model=v2.ref))
        cloud.wait_reported(device, is_active(v2, 2))
        weights_sent = sum(n for digest, _, n in cloud.served[served:] if digest == new.digest)
    after = agent_info(edge)["fetch"]
    assert served_model(edge) == "delta-glm:2"
    # The changed initializers, or less (an initializer packed from several source tensors keeps
    # the pieces of the unchanged ones).
    assert 0 < weights_sent <= changed, (weights_sent, changed, new.size)
    assert after["bytes_reused"] - before["bytes_reused"] >= new.size - weights_sent
