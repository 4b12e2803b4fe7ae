"""Telemetry records into the outbox, and the loop that drains the outbox whenever we are online."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Literal

from edge_agent.outbox import Entry, Outbox
from shared.messages import TelemetryBatch, TelemetryRecord
from shared.topics import Topics

log = logging.getLogger(__name__)

# publish(topic, payload, retain) → True once the broker acknowledged it.
Publish = Callable[[str, bytes, bool], Awaitable[bool]]


class TelemetryRecorder:
    def __init__(self, outbox: Outbox, topics: Topics, device_id: str) -> None:
        self.outbox = outbox
        self.topic = topics.telemetry(device_id)

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
        self.outbox.append_record(self.topic, rec.model_dump_json(by_alias=True).encode())
        return rec.id


class OutboxSender:
    """Drains the outbox in order while the link is up; records go out in TelemetryBatch messages."""

    def __init__(
        self,
        outbox: Outbox,
        device_id: str,
        publish: Publish,
        connected: asyncio.Event,
        batch_size: Callable[[], int],
        linger_s: Callable[[], float] = lambda: 0.0,
    ) -> None:
        self.outbox = outbox
        self.device_id = device_id
        self.publish = publish
        self.connected = connected
        self.batch_size = batch_size
        self.linger_s = linger_s

    async def run(self) -> None:
        while True:
            await self.outbox.wait_for_entries()
            await self.connected.wait()
            entries = self.outbox.peek(self.batch_size())
            linger = self.linger_s()
            if linger > 0 and entries[0].record and len(entries) < self.batch_size():
                # Telemetry waits a moment for company: one message (and one database write in
                # the cloud) per batch of requests, not per request. A full batch goes at once.
                await asyncio.sleep(linger)
                entries = self.outbox.peek(self.batch_size())
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
        self.outbox.remove([e.seq for e in group])
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
