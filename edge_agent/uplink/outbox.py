"""The durable outbox: everything bound for the cloud is written here first (SQLite), then sent.

Delivery is end to end (DESIGN.md §4): an entry is sent, marked in flight when the broker
acknowledged it (QoS 1 PUBACK), and deleted only when the control plane says it stored it (an
``ack`` message naming the entry's id). A broker that loses messages (a restart, a shared
subscription with a dead member), a cloud replica that dies before its database write, a session
that is gone: each only delays delivery, because an entry unacknowledged for ``ack_timeout_s``,
or left in flight by a lost connection, is sent again. The cloud de-duplicates by id. Two kinds
of entry:

* records (telemetry): consecutive records on one topic go out together as one batch message;
* messages (reported state, retained): sent in order, one in flight at a time, so a resent old
  state can never land after a newer one.

SQLite in WAL mode with ``synchronous=NORMAL`` survives a killed process (a committed write is in
the WAL); an OS crash may lose the last moments of telemetry, never corrupt the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from edge_agent.datadir import open_database

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
# Added by end-to-end acknowledgement; an outbox written before has neither (its entries, without
# an id, are forgotten on the broker's PUBACK as they were then).
_COLUMNS = {
    "uid": "ALTER TABLE outbox ADD COLUMN uid TEXT",
    "sent_at": "ALTER TABLE outbox ADD COLUMN sent_at REAL",
}


@dataclass(frozen=True)
class Entry:
    seq: int
    topic: str
    payload: bytes
    record: bool
    retain: bool
    uid: str | None = None


class Outbox:
    def __init__(self, path: Path, max_records: int = 1_000_000) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_records = max_records
        self._db = open_database(path, self._open, "telemetry outbox")
        self._depth = int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        self.dropped = 0
        self.delivered = 0
        self.resent = 0
        # Set on every insert and acknowledgement: the sender waits on it.
        self.changed = asyncio.Event()

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            present = {row[1] for row in db.execute("PRAGMA table_info(outbox)")}
            for column, ddl in _COLUMNS.items():
                if column not in present:
                    db.execute(ddl)
            db.execute("CREATE INDEX IF NOT EXISTS outbox_uid ON outbox (uid)")
            # A new process has no connection yet: whatever was in flight is sent again.
            db.execute("UPDATE outbox SET sent_at = NULL WHERE sent_at IS NOT NULL")
        except BaseException:
            db.close()
            raise
        return db

    def close(self) -> None:
        self._db.close()

    def append_record(self, topic: str, payload: bytes, uid: str | None = None) -> None:
        self._insert(topic, payload, record=True, retain=False, uid=uid)
        if self._depth > self.max_records:
            self._drop_oldest_records()

    def append_message(self, topic: str, payload: bytes, *, retain: bool, uid: str | None = None) -> None:
        self._insert(topic, payload, record=False, retain=retain, uid=uid)

    def _insert(self, topic: str, payload: bytes, *, record: bool, retain: bool, uid: str | None) -> None:
        with self._db:
            self._db.execute(
                "INSERT INTO outbox (topic, payload, record, retain, uid) VALUES (?, ?, ?, ?, ?)",
                (topic, payload, int(record), int(retain), uid),
            )
        self._depth += 1
        self.changed.set()

    def depth(self) -> int:
        """Entries the cloud has not acknowledged yet (waiting or in flight)."""
        return self._depth

    def in_flight(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM outbox WHERE sent_at IS NOT NULL").fetchone()[0])

    def message_in_flight(self) -> bool:
        row = self._db.execute("SELECT 1 FROM outbox WHERE record = 0 AND sent_at IS NOT NULL LIMIT 1")
        return row.fetchone() is not None

    def peek(self, limit: int) -> list[Entry]:
        """The oldest entries not in flight, in order."""
        rows = self._db.execute(
            "SELECT seq, topic, payload, record, retain, uid FROM outbox WHERE sent_at IS NULL "
            "ORDER BY seq LIMIT ?",
            (limit,),
        ).fetchall()
        return [
            Entry(seq, topic, bytes(payload), bool(rec), bool(ret), uid)
            for seq, topic, payload, rec, ret, uid in rows
        ]

    def mark_sent(self, entries: Iterable[Entry]) -> None:
        """The broker has them: in flight until the cloud acknowledges (entries without an id,
        from an outbox written before acknowledgements, are forgotten now, as they were then)."""
        now = time.time()
        legacy = [e.seq for e in entries if e.uid is None]
        with self._db:
            self._db.executemany(
                "UPDATE outbox SET sent_at = ? WHERE seq = ?", [(now, e.seq) for e in entries if e.uid]
            )
        if legacy:
            self.remove(legacy)

    def acknowledge(self, uids: Iterable[str]) -> int:
        """The cloud stored these: forget them. Returns how many were still here."""
        removed = 0
        with self._db:
            for uid in uids:
                removed += self._db.execute("DELETE FROM outbox WHERE uid = ?", (uid,)).rowcount
        self._depth -= removed
        self.delivered += removed
        if removed:
            self.changed.set()
        return removed

    def requeue(self, older_than_s: float | None = None) -> int:
        """Send again what is in flight (all of it, or what has waited longer than ``older_than_s``
        for the cloud's acknowledgement). Returns how many."""
        if older_than_s is None:
            cur = self._db.execute("UPDATE outbox SET sent_at = NULL WHERE sent_at IS NOT NULL")
        else:
            cur = self._db.execute(
                "UPDATE outbox SET sent_at = NULL WHERE sent_at IS NOT NULL AND sent_at < ?",
                (time.time() - older_than_s,),
            )
        self.resent += cur.rowcount
        return int(cur.rowcount)

    def remove(self, seqs: list[int]) -> None:
        removed = 0
        with self._db:
            for seq in seqs:
                removed += self._db.execute("DELETE FROM outbox WHERE seq = ?", (seq,)).rowcount
        self._depth -= removed
        self.delivered += removed

    async def wait_for_change(self, at_most_s: float) -> None:
        """Until something is added or acknowledged, or ``at_most_s`` seconds."""
        self.changed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(at_most_s):  # not wait_for: it can swallow a cancel on 3.11
                await self.changed.wait()

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
