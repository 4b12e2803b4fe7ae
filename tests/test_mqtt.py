"""The MQTT helpers both sides share."""

from __future__ import annotations

import asyncio
import socket

import pytest

from shared.mqtt import BrokerSettings, ReconnectBackoff, make_client


def test_backoff_doubles_to_its_cap_and_resets() -> None:
    b = ReconnectBackoff(0.5, 4.0, jitter=False)
    assert [b.next_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    b.reset()
    assert b.next_delay() == 0.5


def test_jittered_backoff_stays_within_half_to_one_and_a_half() -> None:
    b = ReconnectBackoff(1.0, 1.0, jitter=True)
    delays = [b.next_delay() for _ in range(200)]
    assert all(0.5 <= d <= 1.5 for d in delays)
    assert max(delays) - min(delays) > 0.5
    assert sum(delays) / len(delays) == pytest.approx(1.0, abs=0.1)


def test_clients_send_small_packets_at_once(broker_settings: BrokerSettings) -> None:
    """Nagle's algorithm held a fetch request back for the broker's delayed ACK (40 ms per
    window of a model download): every client socket has TCP_NODELAY."""

    async def option() -> int:
        async with make_client(broker_settings, "nodelay-probe", persistent=False) as client:
            sock = client._client.socket()  # the one place to see the socket
            assert sock is not None
            return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    assert asyncio.run(option()) == 1
