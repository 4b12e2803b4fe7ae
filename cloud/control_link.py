"""The cloud's MQTT session: serves blob fetches, tracks reported state and presence, sets desired state.

This is the minimal control-plane side of the first end-to-end path; the fleet service builds on it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import aiomqtt

from cloud.blob_server import BlobServer
from shared.errors import ContractError, ImpersonationError
from shared.messages import DesiredState, DeviceStatus, ReportedState, TelemetryBatch, from_device
from shared.mqtt import QOS, BrokerSettings, ReconnectBackoff, make_client, payload_bytes
from shared.topics import Topics

log = logging.getLogger(__name__)


def _shared(topic_filter: str, group: str | None) -> str:
    return f"$share/{group}/{topic_filter}" if group else topic_filter


@dataclass
class DeviceView:
    """What the cloud last heard from one device."""

    device_id: str
    reported: ReportedState | None = None
    status: str = "unknown"


@dataclass
class ControlLink:
    broker: BrokerSettings
    topics: Topics
    blob_server: BlobServer
    client_id: str = "autoglm-cloud"
    on_reported: Callable[[ReportedState], None] | None = None
    on_status: Callable[[DeviceStatus], None] | None = None
    on_telemetry: Callable[[TelemetryBatch], None] | None = None
    # With several control-plane replicas: an MQTT v5 shared-subscription group, so each fetch
    # request and telemetry batch reaches exactly one replica.
    share_group: str | None = None
    devices: dict[str, DeviceView] = field(default_factory=dict)
    dropped_messages: int = 0
    # Messages whose payload named another device than their topic (dropped).
    impersonations: int = 0

    def __post_init__(self) -> None:
        self.connected = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._changed = asyncio.Event()

    async def run(self) -> None:
        backoff = ReconnectBackoff(self.broker.reconnect_initial_s, self.broker.reconnect_max_s, jitter=False)
        while True:
            lost: aiomqtt.MqttError | None = None
            try:
                async with make_client(self.broker, self.client_id) as client:
                    self._client = client
                    await self.blob_server.subscribe(client, self.share_group)
                    subscriptions = [
                        (self.topics.all_devices("reported"), QOS),
                        (self.topics.all_devices("status"), QOS),
                    ]
                    if self.on_telemetry is not None:
                        subscriptions.append(
                            (_shared(self.topics.all_devices("telemetry"), self.share_group), QOS)
                        )
                    await client.subscribe(subscriptions)
                    self.connected.set()
                    backoff.reset()
                    async for message in client.messages:
                        await self._dispatch(client, message)
            except aiomqtt.MqttError as exc:
                lost = exc
            finally:
                self._client = None
                self.connected.clear()
            delay = backoff.next_delay()
            log.warning("cloud lost the broker (%s); retrying in %.1fs", lost, delay)
            await asyncio.sleep(delay)

    async def _dispatch(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        payload = payload_bytes(message)
        if self.blob_server.handles(topic):
            await self.blob_server.handle(client, topic, payload)
            return
        try:
            parsed = self.topics.parse(topic)
            assert parsed.device_id is not None
            view = self.devices.setdefault(parsed.device_id, DeviceView(parsed.device_id))
            if parsed.channel == "reported":
                view.reported = from_device(ReportedState, payload, parsed.device_id, topic)
                if self.on_reported is not None:
                    self.on_reported(view.reported)
            elif parsed.channel == "status":
                status = from_device(DeviceStatus, payload, parsed.device_id, topic)
                view.status = status.state
                if self.on_status is not None:
                    self.on_status(status)
            elif parsed.channel == "telemetry" and self.on_telemetry is not None:
                self.on_telemetry(from_device(TelemetryBatch, payload, parsed.device_id, topic))
        except ImpersonationError as exc:
            self.impersonations += 1
            log.warning("dropped a message that names another device: %s", exc)
            return
        except ContractError as exc:
            self.dropped_messages += 1
            log.warning("dropped malformed message on %s: %s", topic, exc)
            return
        self._changed.set()

    async def set_desired(self, device_id: str, state: DesiredState) -> None:
        """Publish retained, so a device that connects later still gets it."""
        await self.connected.wait()
        assert self._client is not None
        await self._client.publish(self.topics.desired(device_id), state.to_json(), qos=QOS, retain=True)

    async def wait_for(self, predicate: Callable[[dict[str, DeviceView]], bool], timeout: float) -> None:
        """Wait until ``predicate(devices)`` holds; TimeoutError otherwise."""
        async with asyncio.timeout(timeout):
            while not predicate(self.devices):
                self._changed.clear()
                await self._changed.wait()
