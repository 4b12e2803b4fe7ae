"""The durable outbox: everything bound for the cloud is written here first (SQLite), then sent.

Entries are delivered in the order they were written, and deleted only after the broker
acknowledged them (QoS 1 PUBACK). A crash between the ack and the delete sends an entry twice;
telemetry records carry ids and reported states revisions, so the cloud de-duplicates.
At-least-once, in order. Two kinds of entry:

* records (telemetry): consecutive records on one topic go out together as one batch message;
* messages (reported state, retained): sent as written, so the cloud sees every transition.

SQLite in WAL mode with ``synchronous=NORMAL`` survives a killed process (a committed write is in
the WAL); an OS crash may lose the last moments of telemetry, never corrupt the file.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    topic   TEXT NOT NULL,
    payload BLOB NOT NULL,
    -- 1: a telemetry record (batched when sent); 0: a whole message.
    record  INTEGER NOT NULL,
    retain  INTEGER NOT NULL
);
"""


@dataclass(frozen=True)
class Entry:
    seq: int
    topic: str
    payload: bytes
    record: bool
    retain: bool


class Outbox:
    def __init__(self, path: Path, max_records: int = 1_000_000) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_records = max_records
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._depth = int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        self.dropped = 0
        self.delivered = 0
        self._added = asyncio.Event()

    def close(self) -> None:
        self._db.close()

    def append_record(self, topic: str, payload: bytes) -> None:
        self._insert(topic, payload, record=True, retain=False)
        if self._depth > self.max_records:
            self._drop_oldest_records()

    def append_message(self, topic: str, payload: bytes, *, retain: bool) -> None:
        self._insert(topic, payload, record=False, retain=retain)

    def _insert(self, topic: str, payload: bytes, *, record: bool, retain: bool) -> None:
        with self._db:
            self._db.execute(
                "INSERT INTO outbox (topic, payload, record, retain) VALUES (?, ?, ?, ?)",
                (topic, payload, int(record), int(retain)),
            )
        self._depth += 1
        self._added.set()

    def depth(self) -> int:
        return self._depth

    def peek(self, limit: int) -> list[Entry]:
        rows = self._db.execute(
            "SELECT seq, topic, payload, record, retain FROM outbox ORDER BY seq LIMIT ?", (limit,)
        ).fetchall()
        return [
            Entry(seq, topic, bytes(payload), bool(rec), bool(ret)) for seq, topic, payload, rec, ret in rows
        ]

    def remove(self, seqs: list[int]) -> None:
        removed = 0
        with self._db:
            for seq in seqs:
                removed += self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,)).rowcount
        self._depth -= removed
        self.delivered += removed

    async def wait_for_entries(self) -> None:
        while self.depth() == 0:
            self._added.clear()
            await self._added.wait()

    def _drop_oldest_records(self) -> None:
        excess = self._depth - self.max_records
        with self._db:
            excess = self._db.execute(
                "DELETE FROM outbox WHERE seq IN "
                "(SELECT seq FROM outbox WHERE record = 1 ORDER BY seq LIMIT ?)",
                (excess,),
            ).rowcount
        self._depth -= excess
        self.dropped += excess
        log.warning(
            "outbox over %d entries: dropped the %d oldest telemetry records", self.max_records, excess
        )
