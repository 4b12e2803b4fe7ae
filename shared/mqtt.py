"""Broker settings and the MQTT v5 client options both sides use (persistent sessions, QoS 1)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.ids import Name

QOS = 1


def _share_property_tables() -> bool:
    """Make paho's MQTT v5 property tables its class's, not every object's.

    paho builds each ``Properties`` object's lookup tables (28 property names, their types and
    packets) afresh in ``__init__`` and walks all 28 names in ``clear()``, which ``unpack`` calls
    first: 6.8 us to make one and 11 us to make one and read an empty property block (Zen 4 VM).
    It makes one for every PUBLISH it reads and two for every PUBACK, so a control plane in a
    30,000-device rollout spent 8-10 % of its samples in ``Properties.__init__`` (py-spy,
    bench/RESULTS.md). The tables are constants that no method changes: shared, an object sets
    only its packet type, and ``clear`` drops the properties it holds. Applied only where a new
    object holds exactly paho 2's four attributes, so another paho keeps its own code; True when
    applied (or already)."""
    if getattr(Properties, "_autoglm_shared_tables", False):
        return True
    sample = Properties(PacketTypes.PUBLISH)
    tables = vars(sample)
    if set(tables) != {"packetType", "types", "names", "properties"}:
        return False
    for name in ("types", "names", "properties"):
        setattr(Properties, name, tables[name])
    attributes = tuple(name.replace(" ", "") for name in tables["names"])

    def __init__(self: Properties, packetType: int) -> None:
        object.__setattr__(self, "packetType", packetType)

    def clear(self: Properties) -> None:
        held = self.__dict__
        if len(held) > 1:  # more than the packet type
            for name in attributes:
                held.pop(name, None)

    Properties.__init__ = __init__  # type: ignore[method-assign]
    Properties.clear = clear  # type: ignore[method-assign]
    Properties._autoglm_shared_tables = True  # type: ignore[attr-defined]
    return True


_share_property_tables()


class TlsSettings(BaseModel):
    """Mutual TLS with the fleet broker (`autoglm fleet enroll` writes these three files)."""

    model_config = ConfigDict(extra="forbid")

    # The fleet CA that signed the broker's certificate.
    ca_file: Path
    # This identity's client certificate and key; the certificate's CN is its MQTT username.
    cert_file: Path | None = None
    key_file: Path | None = None

    @model_validator(mode="after")
    def _files_exist(self) -> TlsSettings:
        for name in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name} {path} does not exist")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        try:
            self.context()  # a file that is no certificate or key is refused now, not at connect
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ValueError(f"the TLS files cannot be used: {exc}") from exc
        return self

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_file))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_file is not None:
            ctx.load_cert_chain(str(self.cert_file), str(self.key_file) if self.key_file else None)
        return ctx


class BrokerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 1883
    username: str | None = None
    password: str | None = None
    # How long the broker keeps a disconnected session's queued messages.
    session_expiry_s: Annotated[int, Field(ge=1)] = 7 * 24 * 3600
    keepalive_s: Annotated[int, Field(ge=5, le=3600)] = 30
    # Reconnect delays double from the first to the longest (with jitter on devices).
    reconnect_initial_s: Annotated[float, Field(gt=0, le=60)] = 0.5
    reconnect_max_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    # None: plain TCP (a broker on a trusted network only). Production brokers require TLS.
    tls: TlsSettings | None = None


def payload_bytes(message: aiomqtt.Message) -> bytes:
    """The payload as bytes, whatever type paho handed over (bytes, str, number or None)."""
    if isinstance(message.payload, bytes):
        return message.payload
    return str(message.payload or "").encode()


def reraise_cancellation(exc: Exception) -> None:
    """Raise CancelledError if the running task is being cancelled, else nothing.

    aiomqtt's ``async with`` exit waits for the broker to acknowledge the DISCONNECT and raises an
    MqttError when that fails (the broker lost, or too busy to answer in time): raised while a
    cancellation unwinds, it replaces the CancelledError, and a reconnect loop that catches
    MqttError would swallow the cancellation and run on — a control plane or agent told to stop
    that never does (seen: a test's cloud still reconnecting 30 s after it was cancelled). A
    message handler may likewise surface a stop as another error."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from exc


class ReconnectBackoff:
    """Delays between reconnect attempts: doubling from ``initial_s`` up to ``max_s``. With jitter
    each delay is scaled by 0.5–1.5, so a fleet that lost its broker does not return in lockstep."""

    def __init__(self, initial_s: float, max_s: float, *, jitter: bool) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.jitter = jitter
        self._next = initial_s

    def reset(self) -> None:
        self._next = self.initial_s

    def next_delay(self) -> float:
        delay = self._next * (random.uniform(0.5, 1.5) if self.jitter else 1.0)  # noqa: S311 (jitter, not a secret)
        self._next = min(self._next * 2, self.max_s)
        return delay


# Publishes awaiting their acknowledgement on one session past which something is stuck.
PENDING_CALLS_WARNING = 1000


class _Client(aiomqtt.Client):
    """An aiomqtt client whose socket sends small packets at once (TCP_NODELAY).

    With Nagle's algorithm on, a small packet (a fetch request, a PUBACK, a desired state) written
    while an earlier one is still unacknowledged waits for the peer's delayed ACK: 40 ms on Linux.
    A model download asks for its chunks a window at a time, and every window started 40-90 ms
    late (bench/shard_push.py); the broker's side is ``set_tcp_nodelay true``.

    aiomqtt logs a warning on every publish made while more than 10 others await their
    acknowledgement; our publishers bound their own concurrency (the control plane's desired
    states and acknowledgements, a download's window), far above 10 in a rollout, so it warns
    only past ``PENDING_CALLS_WARNING``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pending_calls_threshold = PENDING_CALLS_WARNING

    def _on_socket_open(self, client: Any, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(OSError, AttributeError):  # a socket that is not TCP keeps its options
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super()._on_socket_open(client, userdata, sock)


def make_client(
    settings: BrokerSettings,
    client_id: Name,
    *,
    will: aiomqtt.Will | None = None,
    persistent: bool = True,
) -> aiomqtt.Client:
    """A v5 client; persistent sessions need clean_start=False AND a session expiry (FACTS.md)."""
    props = Properties(PacketTypes.CONNECT)
    if persistent:
        props.SessionExpiryInterval = settings.session_expiry_s
    return _Client(
        settings.host,
        settings.port,
        identifier=client_id,
        username=settings.username,
        password=settings.password,
        protocol=aiomqtt.ProtocolVersion.V5,
        clean_start=not persistent,
        properties=props,
        will=will,
        keepalive=settings.keepalive_s,
        max_inflight_messages=64,
        timeout=10,
        tls_context=settings.tls.context() if settings.tls else None,
    )


async def stay_connected(
    connect: Callable[[], aiomqtt.Client],
    *,
    on_connect: Callable[[aiomqtt.Client], Awaitable[None]],
    on_message: Callable[[aiomqtt.Client, aiomqtt.Message], Awaitable[None] | None],
    on_lost: Callable[[], None],
    broker: BrokerSettings,
    jitter: bool,
    log: logging.Logger,
    name: str,
) -> NoReturn:
    """Hold an MQTT session until cancelled: connect, ``on_connect`` (subscriptions, presence),
    hand every message to ``on_message``; when the broker is lost or unreachable, ``on_lost`` and
    connect again after the delay of ``broker``'s backoff (``jitter`` for a fleet of devices).
    The control plane's session and the agent's link both run on it.

    A message whose handling raises (a bug, a full disk while writing a chunk, a registry file
    being rewritten) is logged and the session carries on: one message must not take down a
    device's link or a replica's whole control loop."""
    backoff = ReconnectBackoff(broker.reconnect_initial_s, broker.reconnect_max_s, jitter=jitter)
    while True:
        lost: aiomqtt.MqttError | None = None
        try:
            async with connect() as client:
                await on_connect(client)
                backoff.reset()
                async for message in client.messages:
                    try:
                        handled = on_message(client, message)
                        if handled is not None:
                            await handled
                    except aiomqtt.MqttError:
                        raise  # the session broke while handling it: reconnect
                    except Exception as exc:
                        reraise_cancellation(exc)  # a stop the handler surfaced as another error
                        log.exception("error while handling a message on %s", message.topic.value)
        except aiomqtt.MqttError as exc:
            reraise_cancellation(exc)
            lost = exc
        finally:
            on_lost()
        delay = backoff.next_delay()
        log.warning(
            "%s: broker %s:%d unreachable or lost (%s); retrying in %.1fs",
            name,
            broker.host,
            broker.port,
            lost,
            delay,
        )
        await asyncio.sleep(delay)
