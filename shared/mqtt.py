"""Broker settings and the MQTT v5 client options both sides use (persistent sessions, QoS 1)."""

from __future__ import annotations

from typing import Annotated

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import BaseModel, ConfigDict, Field

from shared.ids import Name

QOS = 1


class BrokerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 1883
    username: str | None = None
    password: str | None = None
    # How long the broker keeps a disconnected session's queued messages.
    session_expiry_s: Annotated[int, Field(ge=1)] = 7 * 24 * 3600
    keepalive_s: Annotated[int, Field(ge=5, le=3600)] = 30


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
    return aiomqtt.Client(
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
    )
