"""The cloud's MQTT session: serves blob fetches, tracks reported state and presence, sets desired state.

This is the minimal control-plane side of the first end-to-end path; the fleet service builds on it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import aiomqtt

from cloud.mqtt.blob_server import BlobServer
from shared.control import ControlSigner
from shared.errors import BrokerUnavailable, ConfigError, ContractError, ImpersonationError
from shared.messages import (
    MAX_TELEMETRY_RECORDS,
    Ack,
    Command,
    CommandReply,
    DesiredState,
    DeviceStatus,
    ReportedState,
    TelemetryBatch,
    from_device,
)
from shared.mqtt import (
    QOS,
    BrokerSettings,
    make_client,
    payload_bytes,
    stay_connected,
)
from shared.topics import Topics

log = logging.getLogger(__name__)

# How long an operator's request waits for the broker session before it is answered 503.
CONNECT_WAIT_S = 10.0


def ack_ids(message: ReportedState | DeviceStatus | TelemetryBatch) -> list[str]:
    """What a device's message asks to be acknowledged by, once stored: its records' ids, or its
    report's id (presence is retained by the broker and needs none)."""
    if isinstance(message, TelemetryBatch):
        return [r.id for r in message.records]
    if isinstance(message, ReportedState) and message.report_id is not None:
        return [message.report_id]
    return []


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
    # Signs desired states and commands; a link without one (a bare blob server) gives no orders.
    signer: ControlSigner | None = None
    client_id: str = "autoglm-cloud"
    on_reported: Callable[[ReportedState], None] | None = None
    on_status: Callable[[DeviceStatus], None] | None = None
    on_telemetry: Callable[[TelemetryBatch], None] | None = None
    # With several control-plane replicas: an MQTT v5 shared-subscription group, so each fetch
    # request and telemetry batch reaches exactly one replica.
    share_group: str | None = None
    # Acknowledge telemetry and reported states as soon as the callbacks above returned (a tool
    # or test cloud). The control plane acknowledges itself, once its database has them.
    auto_ack: bool = True
    # Keep the last report and status of every device in ``devices`` (tools and tests wait on
    # them); the control plane keeps them in its database only, not a second time in memory.
    keep_views: bool = True
    devices: dict[str, DeviceView] = field(default_factory=dict)
    dropped_messages: int = 0
    # Messages whose payload named another device than their topic (dropped).
    impersonations: int = 0

    def __post_init__(self) -> None:
        self.connected = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._changed = asyncio.Event()
        # Commands this link sent and awaits a reply to, by request id: the device commanded
        # and where its reply goes.
        self._replies: dict[str, tuple[str, asyncio.Future[CommandReply]]] = {}
        # Devices whose node's broker bridge said it is down (shared/topics.py, ``bridge``).
        self._bridges_down: set[str] = set()

    async def run(self) -> None:
        """This tenant alone on its own MQTT session (a tool, a test); the control plane runs
        every tenant's link on one session instead (:class:`CloudSession`)."""
        await CloudSession(self.broker, self.client_id, [self]).run()

    def owns(self, topic: str) -> bool:
        return topic.startswith(self.topics.root + "/")

    async def attach(self, client: aiomqtt.Client) -> None:
        """Subscribe this tenant's topics on a (re)connected session."""
        self._client = client
        await self.blob_server.subscribe(client, self.share_group)
        subscriptions = [
            (self.topics.all_devices("reported"), QOS),
            # Bridges first: a node whose bridge is down is known before its (then stale)
            # retained status, which dispatch then passes over (brokers need not keep the order
            # of the filters either way).
            (self.topics.all_devices("bridge"), QOS),
            (self.topics.all_devices("status"), QOS),
            (self.topics.all_devices("replies"), QOS),
        ]
        if self.on_telemetry is not None:
            subscriptions.append((_shared(self.topics.all_devices("telemetry"), self.share_group), QOS))
        await client.subscribe(subscriptions)
        self.connected.set()

    def detach(self) -> None:
        self._client = None
        self.connected.clear()
        self.blob_server.detach()

    async def dispatch(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        payload = payload_bytes(message)
        if self.blob_server.handles(topic):
            await self.blob_server.handle(client, topic, payload)
            return
        try:
            parsed = self.topics.parse(topic)
            assert parsed.device_id is not None
            view = (
                self.devices.setdefault(parsed.device_id, DeviceView(parsed.device_id))
                if self.keep_views
                else None
            )
            if parsed.channel == "reported":
                reported = from_device(ReportedState, payload, parsed.device_id, topic)
                if view is not None:
                    view.reported = reported
                if self.on_reported is not None:
                    self.on_reported(reported)
                if self.auto_ack:
                    await self.send_ack(parsed.device_id, ack_ids(reported))
            elif parsed.channel == "status":
                status = from_device(DeviceStatus, payload, parsed.device_id, topic)
                if message.retain and parsed.device_id in self._bridges_down:
                    return  # what the node said before its bridge went down
                if view is not None:
                    view.status = status.state
                if self.on_status is not None:
                    self.on_status(status)
            elif parsed.channel == "bridge":
                # A node's bridge to this broker went down (its Last Will, or a clean stop): the
                # agent behind it is unreachable, whatever its last status said. Up ("1") says
                # nothing of the agent: the bridge then carries the node's retained status again.
                if payload == b"0":
                    self._bridges_down.add(parsed.device_id)
                    status = DeviceStatus(device_id=parsed.device_id, state="offline")
                    if view is not None:
                        view.status = status.state
                    if self.on_status is not None:
                        self.on_status(status)
                elif payload in (b"1", b""):  # up, or the retained state cleared by an operator
                    self._bridges_down.discard(parsed.device_id)
                else:
                    raise ContractError("a bridge state is 0 or 1", topic=topic)
            elif parsed.channel == "telemetry" and self.on_telemetry is not None:
                batch = from_device(TelemetryBatch, payload, parsed.device_id, topic)
                self.on_telemetry(batch)
                if self.auto_ack:
                    await self.send_ack(parsed.device_id, ack_ids(batch))
            elif parsed.channel == "replies":
                reply = from_device(CommandReply, payload, parsed.device_id, topic)
                pending = self._replies.get(reply.request_id)
                # Only the device commanded answers: another (its own replies topic, the request
                # id seen on an open broker) was taken as its answer.
                if pending is not None and pending[0] == parsed.device_id and not pending[1].done():
                    pending[1].set_result(reply)
                elif pending is not None:
                    self.impersonations += 1
                    log.warning("dropped %s's reply to a command sent to %s", parsed.device_id, pending[0])
        except ImpersonationError as exc:
            self.impersonations += 1
            log.warning("dropped a message that names another device: %s", exc)
            return
        except ContractError as exc:
            self.dropped_messages += 1
            log.warning("dropped malformed message on %s: %s", topic, exc)
            return
        self._changed.set()

    async def send_ack(self, device_id: str, ids: list[str]) -> None:
        """Tell a device these records and reports are stored (it then forgets them). Lost acks
        only mean the device sends those entries again."""
        client = self._client
        if client is None or not ids:
            return
        try:
            for start in range(0, len(ids), MAX_TELEMETRY_RECORDS):
                ack = Ack(ids=ids[start : start + MAX_TELEMETRY_RECORDS])
                await client.publish(self.topics.acks(device_id), ack.to_json(), qos=QOS)
        except aiomqtt.MqttError as exc:
            log.info("could not acknowledge %d entries to %s: %s", len(ids), device_id, exc)

    def _signer(self) -> ControlSigner:
        if self.signer is None:
            raise ConfigError("this link has no control key: it cannot give devices orders")
        return self.signer

    async def set_desired(self, device_id: str, state: DesiredState) -> DesiredState:
        """Sign for ``device_id`` and publish retained, so a device that connects later still gets
        it. Returns the signed message."""
        signed, payload = self._signer().desired_wire(state, device_id=device_id, tenant=self.topics.tenant)
        await self.connected.wait()
        assert self._client is not None
        await self._client.publish(self.topics.desired(device_id), payload, qos=QOS, retain=True)
        return signed

    async def send_command(self, device_id: str, command: Command, wait_s: float) -> CommandReply | None:
        """Sign and send a one-shot command; the device's reply, or None if none came in ``wait_s``
        (the broker keeps it for an offline device's session until the command expires)."""
        signed = self._signer().command(command, device_id=device_id, tenant=self.topics.tenant)
        waiting: asyncio.Future[CommandReply] = asyncio.get_running_loop().create_future()
        self._replies[command.request_id] = (device_id, waiting)
        try:
            try:
                # Bounded: with the broker down an API call waited for it without end.
                async with asyncio.timeout(CONNECT_WAIT_S):
                    await self.connected.wait()
            except TimeoutError:
                raise BrokerUnavailable(
                    f"the control plane is not connected to its MQTT broker (waited {CONNECT_WAIT_S:g} s); "
                    "nothing was sent",
                    device_id=device_id,
                ) from None
            assert self._client is not None
            await self._client.publish(self.topics.commands(device_id), signed.to_json(), qos=QOS)
            if wait_s <= 0:
                return None
            try:
                async with asyncio.timeout(wait_s):  # not wait_for: it can swallow a cancel on 3.11
                    return await asyncio.shield(waiting)
            except TimeoutError:
                return None
        finally:
            self._replies.pop(command.request_id, None)

    async def wait_for(self, predicate: Callable[[dict[str, DeviceView]], bool], within_s: float) -> None:
        """Wait until ``predicate(devices)`` holds; TimeoutError after ``within_s`` seconds."""
        async with asyncio.timeout(within_s):
            while not predicate(self.devices):
                self._changed.clear()
                await self._changed.wait()


class CloudSession:
    """One MQTT session of a control-plane replica, shared by every tenant's link.

    Under the generated broker config the broker replaces a client's id with its certificate
    name (so no device can take over another's session); a replica therefore holds exactly one
    session per identity, and each tenant's link subscribes its topics on it.

    The session ends with the connection (clean start, no expiry): a replica that dies leaves no
    session behind to keep its share of the telemetry and fetch groups, and what the broker could
    not deliver meanwhile is sent again by the devices (end-to-end acknowledgement, §4)."""

    def __init__(self, broker: BrokerSettings, client_id: str, links: list[ControlLink]) -> None:
        self.broker = broker
        self.client_id = client_id
        self.links = links

    async def run(self) -> None:
        await stay_connected(
            lambda: make_client(self.broker, self.client_id, persistent=False),
            on_connect=self._attach,
            on_message=self._dispatch,
            on_lost=self._detach,
            broker=self.broker,
            jitter=False,
            log=log,
            name=f"cloud session {self.client_id}",
        )

    async def _attach(self, client: aiomqtt.Client) -> None:
        for link in self.links:
            await link.attach(client)

    def _detach(self) -> None:
        for link in self.links:
            link.detach()

    async def _dispatch(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        owner = next((k for k in self.links if k.owns(topic)), None)
        if owner is None:
            log.warning("dropped a message outside every tenant on %s", topic)
            return
        await owner.dispatch(client, message)
