"""What devices send, written to the database off the event loop, many messages per transaction.

One thread writes, in arrival order. Each time it is free it takes everything that arrived
meanwhile (up to ``max_batch``) and stores it in one transaction (:meth:`Fleet.record`), then
tells the event loop which messages are stored so that they are acknowledged to their devices
(which only then forget them, §4). Under a trickle that is one message per transaction, as
before; when 10,000 devices report at once, a few hundred per transaction, which is what lets
the control plane keep up (bench/RESULTS.md, rollout_scale.py).

A batch that fails is retried message by message, so one message the database refuses (and that
is therefore not acknowledged, and comes again) does not hold back the others.

Each device has at most ``per_device`` messages waiting: beyond that its messages are dropped,
unacknowledged (it sends them again after its acknowledgement timeout). A device that floods
(a bug, or one identity in an attacker's hands) then delays only itself: one device's 100
telemetry batches in half a second held every other device's reports back 16–23 s, and the
backlog grew without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from cloud.plane.fleet import DeviceMessage, Fleet
from cloud.plane.traffic import FleetTraffic
from shared.messages import TelemetryBatch

log = logging.getLogger(__name__)

# Called on the event loop once the message is in the database.
Stored = Callable[[], None]


@dataclass(frozen=True)
class _Item:
    tenant: str
    message: DeviceMessage
    stored: Stored
    loop: asyncio.AbstractEventLoop


_STOP = object()


# A real agent has a few messages unacknowledged at a time (its outbox sends at most
# max_in_flight records, 1,000 to a batch, and a report waits for its acknowledgement).
MAX_QUEUED_PER_DEVICE = 64


class Ingest:
    def __init__(
        self,
        fleet: Fleet,
        max_batch: int = 500,
        per_device: int = MAX_QUEUED_PER_DEVICE,
        traffic: FleetTraffic | None = None,
    ) -> None:
        self.fleet = fleet
        self.traffic = traffic
        self.max_batch = max_batch
        self.per_device = per_device
        self._queue: queue.SimpleQueue[_Item | object] = queue.SimpleQueue()
        # Messages waiting per (tenant, device); the event loop adds, the ingest thread takes.
        self._waiting: dict[tuple[str, str], int] = {}
        self._waiting_lock = threading.Lock()
        self.refused = 0  # dropped with their device's backlog full
        self._thread = threading.Thread(target=self._run, name="ingest", daemon=True)
        self._thread.start()
        self.batches = 0
        self.stored = 0
        self.failed = 0

    def put(self, tenant: str, message: DeviceMessage, stored: Stored) -> None:
        """From the event loop: store ``message``; ``stored`` runs on this loop when it is. Dropped
        (``stored`` never runs) when its device already has ``per_device`` messages waiting."""
        key = (tenant, message.device_id)
        with self._waiting_lock:
            waiting = self._waiting.get(key, 0)
            if waiting >= self.per_device:
                self.refused += 1
                return
            self._waiting[key] = waiting + 1
        self._queue.put(_Item(tenant, message, stored, asyncio.get_running_loop()))

    @property
    def backlog(self) -> int:
        """Messages waiting to be stored."""
        with self._waiting_lock:
            return sum(self._waiting.values())

    def close(self) -> None:
        """Store what is queued, then stop the thread."""
        self._queue.put(_STOP)
        self._thread.join()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            self._store([i for i in batch if isinstance(i, _Item)])
            if stop:
                return

    def _store(self, batch: list[_Item]) -> None:
        with self._waiting_lock:
            for item in batch:
                key = (item.tenant, item.message.device_id)
                left = self._waiting.get(key, 1) - 1
                if left > 0:
                    self._waiting[key] = left
                else:
                    self._waiting.pop(key, None)
        try:
            self.fleet.record([(i.tenant, i.message) for i in batch])
            done = batch
        except Exception:
            log.warning("storing %d device message(s) at once failed; one by one", len(batch), exc_info=True)
            done = []
            for item in batch:
                try:
                    self.fleet.record([(item.tenant, item.message)])
                    done.append(item)
                except Exception:
                    # Not acknowledged: the device sends it again.
                    self.failed += 1
                    log.error("could not store a message from %s", item.message.device_id, exc_info=True)
        self.batches += 1
        self.stored += len(done)
        if self.traffic is not None:
            for item in done:
                if isinstance(item.message, TelemetryBatch):
                    self.traffic.observe(item.tenant, item.message)
        # One wake-up of each loop per batch, not one per message (each is a write to the
        # loop's self-pipe: 10,000 of them when a fleet reports at once).
        by_loop: dict[asyncio.AbstractEventLoop, list[Stored]] = {}
        for item in done:
            by_loop.setdefault(item.loop, []).append(item.stored)
        for loop, callbacks in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop closed: shutting down
                loop.call_soon_threadsafe(_run_all, callbacks)


def _run_all(callbacks: list[Stored]) -> None:
    for stored in callbacks:
        try:
            stored()
        except Exception:  # one failing callback must not keep the others' devices unacknowledged
            log.exception("a stored-message callback failed")
