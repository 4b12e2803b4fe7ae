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
from tests.conftest import DEVICE, CloudSide, EdgeProcess
from tests.services import start_cloud


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
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not httpx.get(f"{edge.api}/v1/agent", timeout=5).json()["online"]:
        time.sleep(0.2)
    before = httpx.get(f"{edge.api}/v1/agent", timeout=5).json()["dropped_messages"]
    pinned = json.loads(DesiredState(revision=1, model=demo_package.ref).to_json())
    for revision in (10**30, MAX_REVISION + 1):
        cloud.publish_raw(
            [(cloud.topics.desired(DEVICE), json.dumps({**pinned, "revision": revision}).encode())]
        )
    deadline = time.monotonic() + 10
    dropped = before
    while time.monotonic() < deadline and dropped < before + 2:
        dropped = httpx.get(f"{edge.api}/v1/agent", timeout=5).json()["dropped_messages"]
        time.sleep(0.1)
    assert dropped == before + 2
    # A later legitimate revision is applied as usual, and reported within int64.
    reported = cloud.drive(
        DesiredState(revision=1, model=demo_package.ref), lambda r: r.phase == Phase.ACTIVE
    )
    assert reported.revision == 1
    assert "less than or equal to 9223372036854775807" in edge.log_text()
