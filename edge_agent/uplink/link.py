"""The edge side of MQTT: one persistent session, reconnects with backoff and jitter.

Every inbound payload is validated; a malformed one is dropped with a log line and the agent
carries on. Retained presence uses the Last Will, so the cloud sees ``offline`` when we vanish.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import aiomqtt

from shared.errors import ContractError
from shared.messages import Ack, Command, CommandReply, DesiredState, DeviceStatus, FetchRequest
from shared.mqtt import (
    QOS,
    BrokerSettings,
    make_client,
    payload_bytes,
    stay_connected,
)
from shared.tasks import TaskSet
from shared.topics import Topics

log = logging.getLogger(__name__)


class CloudLink:
    def __init__(
        self,
        broker: BrokerSettings,
        topics: Topics,
        device_id: str,
        *,
        on_desired: Callable[[DesiredState], None],
        on_chunk: Callable[[str, int, bytes], None],
        on_command: Callable[[Command], Awaitable[CommandReply]] | None = None,
        on_ack: Callable[[Ack], None] | None = None,
        on_range: Callable[[str, int, bytes], None] | None = None,
    ) -> None:
        self.broker = broker
        self.topics = topics
        self.device_id = device_id
        self.on_desired = on_desired
        self.on_chunk = on_chunk
        # A run of whole chunks (digest, byte offset, data): blobs cut at tensor boundaries.
        self.on_range = on_range
        self.on_command = on_command
        self.on_ack = on_ack
        # Connections made so far: the outbox sends again what a lost session left unacknowledged.
        self.sessions = 0
        self.connected = asyncio.Event()
        self.dropped_messages = 0
        # Late Last Wills of earlier connections answered with a fresh ``online``.
        self.stale_wills = 0
        self._replies = TaskSet(log)
        self._client: aiomqtt.Client | None = None
        self._blob_filters: set[str] = set()
        self.ack_timeout_s = 30.0

    @property
    def online(self) -> bool:
        return self.connected.is_set()

    async def run(self) -> None:
        """Stay connected until cancelled."""
        await stay_connected(
            lambda: make_client(self.broker, self.device_id, will=self._will()),
            on_connect=self._on_connect,
            on_message=self._dispatch,
            on_lost=self._on_lost,
            broker=self.broker,
            jitter=True,
            log=log,
            name=f"device {self.device_id}",
        )

    def _will(self) -> aiomqtt.Will:
        """Presence ``offline``, stamped as of this connection (the broker keeps it retained)."""
        return aiomqtt.Will(
            self.topics.status(self.device_id),
            DeviceStatus(device_id=self.device_id, state="offline").to_json(),
            qos=QOS,
            retain=True,
        )

    def _on_lost(self) -> None:
        self._client = None
        self.connected.clear()

    async def _on_connect(self, client: aiomqtt.Client) -> None:
        self._client = client
        # Subscriptions are renewed on every connect: cheap, and right whether or not the session survived.
        await client.subscribe(
            [
                (self.topics.desired(self.device_id), QOS),
                (self.topics.commands(self.device_id), QOS),
                (self.topics.acks(self.device_id), QOS),
                # Its own presence: to answer a stale Last Will (see _dispatch).
                (self.topics.status(self.device_id), QOS),
            ]
        )
        for flt in self._blob_filters:
            await client.subscribe(flt, qos=QOS)
        await self._announce(client)
        self.sessions += 1
        self.connected.set()
        log.info("connected to broker %s:%d as %s", self.broker.host, self.broker.port, self.device_id)

    async def _announce(self, client: aiomqtt.Client) -> None:
        """Retained presence ``online`` (the Last Will is the ``offline`` one)."""
        await client.publish(
            self.topics.status(self.device_id),
            DeviceStatus(device_id=self.device_id, state="online").to_json(),
            qos=QOS,
            retain=True,
        )

    async def _announce_again(self, client: aiomqtt.Client) -> None:
        try:
            await self._announce(client)
        except aiomqtt.MqttError as exc:
            # The session broke meanwhile: the next one announces itself on connecting.
            log.info("could not announce online again (%s)", exc)

    def _dispatch(self, client: aiomqtt.Client, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        payload = payload_bytes(message)
        try:
            parsed = self.topics.parse(topic)
            if parsed.channel == "blob":
                assert parsed.digest is not None
                if parsed.chunk is not None:
                    self.on_chunk(parsed.digest, parsed.chunk, payload)
                elif parsed.offset is not None and self.on_range is not None:
                    self.on_range(parsed.digest, parsed.offset, payload)
            elif parsed.channel == "desired":
                self.on_desired(DesiredState.from_json(payload))
            elif parsed.channel == "acks":
                ack = Ack.from_json(payload)
                if self.on_ack is not None:
                    self.on_ack(ack)
            elif parsed.channel == "commands":
                command = Command.from_json(payload)
                self._replies.spawn(self._answer(client, command), name="command-reply")
            elif parsed.channel == "status":
                status = DeviceStatus.from_json(payload)
                # An ``offline`` that arrives live while this session is up is a Last Will of an
                # earlier connection published late: MQTT 5 has a broker publish the will of a
                # connection that a reconnect took over (mosquitto 2.0 does not for persistent
                # sessions), and it can reach subscribers after our ``online``. The control plane
                # and the retained presence would say offline until the next reconnect, and a
                # rollout would skip a device that is serving. A retained one is history (sent on
                # subscribing, before this session's ``online``); our own ``online`` echoes back
                # and needs nothing. The will of a connection that broke is also queued for this
                # persistent session and arrives after a reconnect: answered too, once, which
                # costs one message.
                if status.state == "offline" and status.device_id == self.device_id and not message.retain:
                    self.stale_wills += 1
                    log.info("an offline status of an earlier connection arrived; announcing online again")
                    self._replies.spawn(self._announce_again(client), name="presence")
            else:
                raise ContractError("unexpected topic for a device", topic=topic)
        except ContractError as exc:
            self.dropped_messages += 1
            log.warning("dropped malformed message on %s: %s", topic, exc)

    async def _answer(self, client: aiomqtt.Client, command: Command) -> None:
        if self.on_command is None:
            reply = CommandReply(
                request_id=command.request_id,
                device_id=self.device_id,
                ok=False,
                detail="this link takes no commands",
            )
        else:
            # The handler checks the signature first, ping included: an unsigned ping is refused.
            reply = await self.on_command(command)
        try:
            await client.publish(self.topics.replies(self.device_id), reply.to_json(), qos=QOS)
        except aiomqtt.MqttError as exc:
            log.warning("could not reply to %s: %s", command.request_id, exc)

    async def publish(self, topic: str, payload: bytes, retain: bool = False) -> bool:
        """QoS 1 publish; True once the broker acknowledged it, False when offline or the link broke."""
        client = self._client
        if client is None or not self.online:
            return False
        try:
            async with asyncio.timeout(self.ack_timeout_s):
                await client.publish(topic, payload, qos=QOS, retain=retain)
            return True
        except (aiomqtt.MqttError, TimeoutError) as exc:
            log.info("publish to %s not acknowledged (%s); the outbox keeps it", topic, exc or "timeout")
            return False

    # -- ChunkChannel for the fetcher ---------------------------------------------------------
    async def subscribe_blob(self, digest: str) -> None:
        flt = self.topics.blob_chunks(digest)
        self._blob_filters.add(flt)
        await self.connected.wait()
        client = self._client
        if client is not None:
            try:
                await client.subscribe(flt, qos=QOS)
            except aiomqtt.MqttError as exc:
                # The filter is remembered: _on_connect subscribes it again after the reconnect.
                log.info("subscription to %s waits for the broker: %s", flt, exc)

    async def unsubscribe_blob(self, digest: str) -> None:
        flt = self.topics.blob_chunks(digest)
        self._blob_filters.discard(flt)
        if self._client is not None and self.online:
            try:
                await self._client.unsubscribe(flt)
            except aiomqtt.MqttError:
                pass  # the filter is gone from our set; a new session will not have it

    async def send_fetch(self, request: FetchRequest) -> None:
        while True:
            await self.connected.wait()
            client = self._client
            if client is None:
                continue
            try:
                await client.publish(self.topics.fetch(self.device_id), request.to_json(), qos=QOS)
                return
            except aiomqtt.MqttError as exc:
                log.info("fetch request waits for the broker: %s", exc)
                await asyncio.sleep(0.5)
