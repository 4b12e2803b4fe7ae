"""Telemetry records into the outbox, and the loop that drains the outbox whenever we are online."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Literal

from edge_agent.uplink.outbox import Entry, Outbox
from shared.messages import TelemetryBatch, TelemetryRecord
from shared.topics import Topics

log = logging.getLogger(__name__)

# publish(topic, payload, retain) → True once the broker acknowledged it.
Publish = Callable[[str, bytes, bool], Awaitable[bool]]


class TelemetryRecorder:
    def __init__(self, outbox: Outbox, topics: Topics, device_id: str) -> None:
        self.outbox = outbox
        self.topic = topics.telemetry(device_id)
        # Records that could not be stored (a full disk): dropped, counted, never an error for
        # the request that was served.
        self.lost = 0

    def record(
        self,
        *,
        model: str,
        served_by: Literal["local", "cloud"],
        prompt_tokens: int,
        completion_tokens: int,
        latency_ms: float,
        error: str | None = None,
    ) -> str:
        rec = TelemetryRecord(
            id=uuid.uuid4().hex,
            at=datetime.now(UTC),
            model=model,
            served_by=served_by,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            latency_ms=latency_ms,
            ok=error is None,
            error=error,
        )
        try:
            self.outbox.append_record(self.topic, rec.model_dump_json(by_alias=True).encode(), uid=rec.id)
        except (sqlite3.Error, OSError) as exc:
            self.lost += 1
            log.warning(
                "telemetry record dropped, the outbox cannot store it (%s); %d lost so far", exc, self.lost
            )
        return rec.id


class OutboxSender:
    """Drains the outbox in order while the link is up; records go out in TelemetryBatch messages.

    What the broker took stays in flight until the cloud acknowledges it; a new session, or an
    acknowledgement overdue by ``ack_timeout_s``, sends it again. At most ``max_in_flight``
    entries wait for acknowledgement at once, so a cloud that is away costs the broker one
    window per timeout, not the whole outbox."""

    def __init__(
        self,
        outbox: Outbox,
        device_id: str,
        publish: Publish,
        connected: asyncio.Event,
        batch_size: Callable[[], int],
        linger_s: Callable[[], float] = lambda: 0.0,
        *,
        sessions: Callable[[], int] = lambda: 0,
        ack_timeout_s: float = 30.0,
        max_in_flight: int = 2000,
    ) -> None:
        self.outbox = outbox
        self.device_id = device_id
        self.publish = publish
        self.connected = connected
        self.batch_size = batch_size
        self.linger_s = linger_s
        self.sessions = sessions
        self.ack_timeout_s = ack_timeout_s
        self.max_in_flight = max_in_flight

    async def run(self) -> None:
        session = self.sessions()
        while True:
            await self.connected.wait()
            if self.sessions() != session:
                session = self.sessions()
                # A new connection: what the last one left unacknowledged may never have arrived.
                if n := self.outbox.requeue():
                    log.info("sending %d unacknowledged outbox entries again on the new session", n)
            elif n := self.outbox.requeue(self.ack_timeout_s):
                log.info(
                    "%d outbox entries unacknowledged for %.0fs: sending them again", n, self.ack_timeout_s
                )
            entries = self.outbox.peek(self.batch_size())
            blocked = bool(entries) and (
                self.outbox.in_flight() >= self.max_in_flight
                or (not entries[0].record and self.outbox.message_in_flight())
            )
            if not entries or blocked:
                # Woken by a new entry or an ack; the short timeout notices a reconnect and overdue acks.
                await self.outbox.wait_for_change(min(0.25, self.ack_timeout_s))
                continue
            linger = self.linger_s()
            if linger > 0 and entries[0].record and len(entries) < self.batch_size():
                # Telemetry waits a moment for company: one message (and one database write in
                # the cloud) per batch of requests, not per request. A full batch goes at once.
                await asyncio.sleep(linger)
                entries = self.outbox.peek(self.batch_size())
                if not entries:
                    continue
            if not await self._send(_leading_group(entries)):
                await asyncio.sleep(0.5)  # lost the link mid-send; wait for the reconnect

    async def _send(self, group: list[Entry]) -> bool:
        first = group[0]
        if not first.record:
            payload = first.payload
        else:
            records = [TelemetryRecord.model_validate_json(e.payload) for e in group]
            payload = TelemetryBatch(device_id=self.device_id, records=records).to_json()
        if not await self.publish(first.topic, payload, first.retain):
            return False
        self.outbox.mark_sent(group)
        return True


def _leading_group(entries: list[Entry]) -> list[Entry]:
    """The first entry alone if it is a whole message, else the run of records on its topic."""
    first = entries[0]
    if not first.record:
        return [first]
    group = [first]
    for e in entries[1:]:
        if not e.record or e.topic != first.topic:
            break
        group.append(e)
    return group
