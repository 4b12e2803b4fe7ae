"""Offline autonomy: with the broker gone the agent serves on, and its telemetry arrives afterwards."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx

from cloud.mqtt.local_broker import LocalBroker
from cloud.registry import ModelRegistry, RegistryEntry
from shared.messages import Ack, DesiredState, ReportedState, TelemetryBatch
from shared.mqtt import QOS, BrokerSettings, make_client, payload_bytes
from shared.signing import SigningKey
from shared.topics import Topics
from tests.conftest import BackgroundCloud, EdgeProcess, is_active
from tests.services import eventually

REQUESTS = 1000
RECEIVER = "telemetry-receiver"


def test_a_thousand_requests_offline_are_served_and_their_telemetry_delivered_once_back(
    private_broker: LocalBroker,
    tenant: str,
    registry: ModelRegistry,
    signing_key: SigningKey,
    demo_package: RegistryEntry,
    edge_factory: Callable[..., EdgeProcess],
) -> None:
    settings = BrokerSettings(
        host=private_broker.host, port=private_broker.port, reconnect_initial_s=0.2, reconnect_max_s=1.0
    )
    topics = Topics(tenant)
    device = "offline-1"

    async def subscribe_receiver() -> None:
        # A persistent session: the broker queues telemetry for it even before it reconnects.
        async with make_client(settings, RECEIVER) as client:
            await client.subscribe(topics.telemetry(device), qos=QOS)
            await client.subscribe(topics.reported(device), qos=QOS)

    asyncio.run(subscribe_receiver())

    edge = edge_factory(device_id=device, tenant=tenant, broker=settings, trusted=[signing_key.public.b64])
    with BackgroundCloud(settings, tenant, registry) as cloud:
        cloud.set_desired(device, DesiredState(revision=1, model=demo_package.ref))
        cloud.wait_reported(device, is_active(demo_package, 1))
    edge.wait_ready()

    private_broker.stop()
    _wait(lambda: not _agent(edge)["online"], 30, "the agent to notice the broker is gone")

    started = time.perf_counter()
    with httpx.Client(base_url=edge.api, timeout=30) as http:
        for i in range(REQUESTS):
            r = http.post(
                "/v1/completions",
                json={"model": "demo-glm", "prompt": f"x{i} = ", "max_tokens": 1, "temperature": 0},
            )
            assert r.status_code == 200, r.text
            assert r.headers["x-autoglm-served-by"] == "local"
    offline_s = time.perf_counter() - started
    info = _agent(edge)
    assert info["online"] is False
    assert info["outbox"]["depth"] >= REQUESTS

    private_broker.start()

    async def receive() -> tuple[set[str], int]:
        """Play the control plane: take the telemetry and reports, acknowledge them, until the
        device's outbox is empty."""
        ids: set[str] = set()
        total = 0
        async with make_client(settings, RECEIVER) as client:
            messages = aiter(client.messages)
            async with asyncio.timeout(90):
                while True:
                    try:
                        message = await asyncio.wait_for(anext(messages), 1.0)
                    except TimeoutError:
                        depth = (await asyncio.to_thread(_agent, edge))["outbox"]
                        if len(ids) >= REQUESTS and isinstance(depth, dict) and depth["depth"] == 0:
                            return ids, total
                        continue
                    if message.topic.matches(topics.reported(device)):
                        # The reports the test's cloud was gone for: acknowledged as a control plane would.
                        report = ReportedState.from_json(payload_bytes(message))
                        uid = report.report_id
                        if uid is not None:
                            await client.publish(topics.acks(device), Ack(ids=[uid]).to_json(), qos=QOS)
                        continue
                    batch = TelemetryBatch.from_json(payload_bytes(message))
                    assert batch.device_id == device
                    for rec in batch.records:
                        assert rec.ok and rec.served_by == "local" and rec.model == "demo-glm:1"
                        assert rec.completion_tokens <= 1
                        ids.add(rec.id)
                        total += 1
                    # Stored: the device may forget them (end-to-end acknowledgement).
                    ack = Ack(ids=[r.id for r in batch.records])
                    await client.publish(topics.acks(device), ack.to_json(), qos=QOS)

    ids, total = asyncio.run(receive())
    assert len(ids) == REQUESTS, f"{len(ids)} distinct records after {offline_s:.0f}s offline"
    # At least once: a duplicate would be legal (the cloud de-duplicates by id), none is expected here.
    assert total >= REQUESTS
    outbox = _agent(edge)["outbox"]
    assert isinstance(outbox, dict) and outbox["depth"] == 0 and outbox["in_flight"] == 0, outbox


def _agent(edge: EdgeProcess) -> dict[str, object]:
    data: dict[str, object] = httpx.get(f"{edge.api}/v1/agent", timeout=10).json()
    return data


def _wait(check: Callable[[], bool], timeout: float, what: str) -> None:
    eventually(check, timeout, what)
