"""The durable journal of the Batch API: files, batches and one row per request (SQLite, WAL).

Everything a batch needs to finish after a crash, a restart or a week offline is here, written
before the worker acts on it: the uploaded files, each batch, and each request with its state
(``states.py``), timestamps and, once final, its one result line. A result is written in the
same transaction that makes its request final, keyed by (batch, index), and only if the request
was not final already: a restart re-runs what was unfinished and never writes a result twice. The
last result of a batch also materializes its output and error files and completes the batch, in
that same transaction.

SQLite in WAL mode with ``synchronous=NORMAL`` survives a killed process (a committed write is
in the WAL); the schema evolves by the frozen migrations below, applied by ``user_version``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.batch.states import (
    FINISHED,
    UNFINISHED,
    ItemState,
    batch_may_move,
    item_may_move,
)
from edge_agent.datadir import open_database
from shared.batch_api import (
    Batch,
    BatchInputLine,
    BatchLineError,
    BatchOutputLine,
    BatchRequestCounts,
    BatchStatus,
    FileObject,
    FilePurpose,
)
from shared.errors import Conflict, NotFound, StorageFull

log = logging.getLogger(__name__)

# Each migration's DDL as written when it was added: never edited, only appended to.
_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE files (
        seq        INTEGER PRIMARY KEY AUTOINCREMENT,
        id         TEXT NOT NULL UNIQUE,
        filename   TEXT NOT NULL,
        purpose    TEXT NOT NULL,
        bytes      INTEGER NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL,
        content    BLOB NOT NULL
    );
    CREATE TABLE batches (
        seq               INTEGER PRIMARY KEY AUTOINCREMENT,
        id                TEXT NOT NULL UNIQUE,
        endpoint          TEXT NOT NULL,
        input_file_id     TEXT NOT NULL,
        completion_window TEXT NOT NULL,
        status            TEXT NOT NULL,
        metadata          TEXT,
        created_at        REAL NOT NULL,
        in_progress_at    REAL,
        expires_at        REAL NOT NULL,
        finalizing_at     REAL,
        completed_at      REAL,
        expired_at        REAL,
        cancelling_at     REAL,
        cancelled_at      REAL,
        output_file_id    TEXT,
        error_file_id     TEXT,
        total             INTEGER NOT NULL,
        completed         INTEGER NOT NULL DEFAULT 0,
        failed            INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE items (
        batch_id    TEXT NOT NULL,
        idx         INTEGER NOT NULL,
        custom_id   TEXT NOT NULL,
        url         TEXT NOT NULL,
        body        TEXT NOT NULL,
        state       TEXT NOT NULL,
        attempts    INTEGER NOT NULL DEFAULT 0,
        created_at  REAL NOT NULL,
        updated_at  REAL NOT NULL,
        finished_at REAL,
        served_by   TEXT,
        result      TEXT,
        PRIMARY KEY (batch_id, idx)
    );
    CREATE INDEX items_by_state ON items (state, batch_id, idx);
    CREATE INDEX batches_by_status ON batches (status, expires_at);
    CREATE INDEX files_by_expiry ON files (expires_at);
    """,
)

# Lines of the error file for requests that never ran.
CANCELLED = BatchLineError(code="batch_cancelled", message="The batch was cancelled before this request ran.")
EXPIRED = BatchLineError(
    code="batch_expired", message="This request could not be executed before the completion window expired."
)

# The queries are literal strings (never assembled): nothing a client sends can become SQL.
_SELECT_BATCH = """
    SELECT id, endpoint, input_file_id, completion_window, status, metadata, created_at, in_progress_at,
        expires_at, finalizing_at, completed_at, expired_at, cancelling_at, cancelled_at,
        output_file_id, error_file_id, total, completed, failed
    FROM batches"""
_SELECT_FILE = "SELECT id, filename, purpose, bytes, created_at, expires_at FROM files"
# A batch's status and the column of when it entered it, by status.
_SET_STATUS: dict[str, str] = {
    "finalizing": "UPDATE batches SET status = ?, finalizing_at = ? WHERE id = ? AND status = ?",
    "completed": "UPDATE batches SET status = ?, completed_at = ? WHERE id = ? AND status = ?",
    "expired": "UPDATE batches SET status = ?, expired_at = ? WHERE id = ? AND status = ?",
    "cancelling": "UPDATE batches SET status = ?, cancelling_at = ? WHERE id = ? AND status = ?",
    "cancelled": "UPDATE batches SET status = ?, cancelled_at = ? WHERE id = ? AND status = ?",
}


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def _ts(value: float | None) -> int | None:
    return None if value is None else int(value)


@dataclass(frozen=True)
class StoredFile:
    id: str
    filename: str
    purpose: FilePurpose
    bytes: int
    created_at: float
    expires_at: float | None

    def wire(self) -> FileObject:
        return FileObject(
            id=self.id,
            bytes=self.bytes,
            created_at=int(self.created_at),
            filename=self.filename,
            purpose=self.purpose,
            expires_at=_ts(self.expires_at),
        )


@dataclass(frozen=True)
class BatchRecord:
    id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: BatchStatus
    metadata: dict[str, str] | None
    created_at: float
    in_progress_at: float | None
    expires_at: float
    finalizing_at: float | None
    completed_at: float | None
    expired_at: float | None
    cancelling_at: float | None
    cancelled_at: float | None
    output_file_id: str | None
    error_file_id: str | None
    total: int
    completed: int
    failed: int

    @property
    def finished_at(self) -> float | None:
        return self.completed_at or self.expired_at or self.cancelled_at

    def wire(self) -> Batch:
        return Batch(
            id=self.id,
            endpoint=self.endpoint,
            input_file_id=self.input_file_id,
            completion_window=self.completion_window,
            status=self.status,
            output_file_id=self.output_file_id,
            error_file_id=self.error_file_id,
            created_at=int(self.created_at),
            in_progress_at=_ts(self.in_progress_at),
            expires_at=int(self.expires_at),
            finalizing_at=_ts(self.finalizing_at),
            completed_at=_ts(self.completed_at),
            expired_at=_ts(self.expired_at),
            cancelling_at=_ts(self.cancelling_at),
            cancelled_at=_ts(self.cancelled_at),
            request_counts=BatchRequestCounts(total=self.total, completed=self.completed, failed=self.failed),
            metadata=self.metadata,
        )


@dataclass(frozen=True)
class Item:
    """One request of a batch, as the worker runs it."""

    batch_id: str
    index: int
    custom_id: str
    url: str
    body: dict[str, Any]
    state: ItemState
    attempts: int

    @property
    def key(self) -> tuple[str, int]:
        return (self.batch_id, self.index)


class BatchJournal:
    def __init__(self, path: Path, *, retention_s: float, clock: Callable[[], float] = time.time) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.retention_s = retention_s
        self.clock = clock
        self._db = open_database(path, self._open, "batch journal")

    def _open(self) -> sqlite3.Connection:
        db = self._connect()
        try:
            db.execute("PRAGMA journal_mode=WAL")
            self._migrate(db)
        except BaseException:
            db.close()
            raise
        return db

    def _connect(self, busy_timeout_s: float = 5.0) -> sqlite3.Connection:
        # Autocommit; transactions are explicit (``_tx``), so each step is all or nothing.
        db = sqlite3.connect(
            str(self.path), isolation_level=None, check_same_thread=False, timeout=busy_timeout_s
        )
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    def close(self) -> None:
        self._db.close()

    def _migrate(self, db: sqlite3.Connection) -> None:
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        for number, ddl in enumerate(_MIGRATIONS[version:], start=version + 1):
            with self._tx(db):
                for statement in ddl.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {number}")

    @contextlib.contextmanager
    def _tx(self, db: sqlite3.Connection | None = None) -> Iterator[sqlite3.Connection]:
        db = self._db if db is None else db
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                # SQLite has already rolled back after some errors (a full disk): a ROLLBACK then
                # raised "no transaction is active" in place of the error that mattered.
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_FULL:
                raise
            if db.in_transaction:
                db.execute("ROLLBACK")
            log.error("the batch journal %s cannot grow: %s", self.path, exc)
            raise StorageFull(
                f"the disk holding the batch journal is full ({exc}); nothing was stored: delete files "
                "or batches, or free space in the agent's data folder",
            ) from exc

    # -- files -----------------------------------------------------------------------------------
    def add_file(self, filename: str, purpose: FilePurpose, content: bytes) -> StoredFile:
        with self._tx():
            return self._add_file(filename, purpose, content, self.clock())

    def _add_file(self, filename: str, purpose: FilePurpose, content: bytes, now: float) -> StoredFile:
        stored = StoredFile(new_id("file-"), filename, purpose, len(content), now, now + self.retention_s)
        self._db.execute(
            "INSERT INTO files (id, filename, purpose, bytes, created_at, expires_at, content) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (stored.id, filename, purpose, stored.bytes, now, stored.expires_at, content),
        )
        return stored

    def file(self, file_id: str) -> StoredFile:
        row = self._db.execute(_SELECT_FILE + " WHERE id = ?", (file_id,)).fetchone()
        if row is None:
            raise NotFound(f"no file {file_id!r} (never uploaded, deleted or expired)", param="file_id")
        return StoredFile(*row)

    def content(self, file_id: str) -> bytes:
        row = self._db.execute("SELECT content FROM files WHERE id = ?", (file_id,)).fetchone()
        if row is None:
            raise NotFound(f"no file {file_id!r} (never uploaded, deleted or expired)", param="file_id")
        return bytes(row[0])

    def files(
        self, *, purpose: str | None = None, limit: int = 10_000, after: str | None = None
    ) -> tuple[list[StoredFile], bool]:
        """Newest first, from the one after ``after``; and whether more follow."""
        rows = self._db.execute(
            "SELECT id, filename, purpose, bytes, created_at, expires_at FROM files "
            "WHERE (? IS NULL OR purpose = ?) AND (? IS NULL OR seq < (SELECT seq FROM files WHERE id = ?)) "
            "ORDER BY seq DESC LIMIT ?",
            (purpose, purpose, after, after, limit + 1),
        ).fetchall()
        return [StoredFile(*r) for r in rows[:limit]], len(rows) > limit

    def delete_file(self, file_id: str) -> None:
        with self._tx():
            if self._db.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount == 0:
                raise NotFound(f"no file {file_id!r} (never uploaded, deleted or expired)", param="file_id")

    # -- batches ---------------------------------------------------------------------------------
    def create_batch(
        self,
        *,
        endpoint: str,
        input_file_id: str,
        completion_window: str,
        window_s: float,
        metadata: dict[str, str] | None,
        lines: Sequence[BatchInputLine],
    ) -> BatchRecord:
        """A batch in progress with one pending item per line, in one transaction.

        May run off the event loop: it writes through a connection of its own (SQLite's WAL
        lets the loop's connection read meanwhile), its rows made before the transaction."""
        now = self.clock()
        batch_id = new_id("batch_")
        rows = [
            (batch_id, i, line.custom_id, line.url, json.dumps(line.body), ItemState.PENDING_LOCAL, now, now)
            for i, line in enumerate(lines)
        ]
        db = self._connect(busy_timeout_s=60.0)
        try:
            with self._tx(db):
                db.execute(
                    "INSERT INTO batches (id, endpoint, input_file_id, completion_window, status, metadata, "
                    "created_at, in_progress_at, expires_at, total) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        batch_id,
                        endpoint,
                        input_file_id,
                        completion_window,
                        "in_progress",
                        json.dumps(metadata) if metadata is not None else None,
                        now,
                        now,
                        now + window_s,
                        len(rows),
                    ),
                )
                db.executemany(
                    "INSERT INTO items (batch_id, idx, custom_id, url, body, state, created_at, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
            row = db.execute(_SELECT_BATCH + " WHERE id = ?", (batch_id,)).fetchone()
        finally:
            db.close()
        return _batch(row)

    def batch(self, batch_id: str) -> BatchRecord:
        row = self._db.execute(_SELECT_BATCH + " WHERE id = ?", (batch_id,)).fetchone()
        if row is None:
            raise NotFound(f"no batch {batch_id!r}", param="batch_id")
        return _batch(row)

    def batches(self, *, limit: int = 20, after: str | None = None) -> tuple[list[BatchRecord], bool]:
        """Newest first, from the one after ``after``; and whether more follow."""
        rows = self._db.execute(
            "SELECT id, endpoint, input_file_id, completion_window, status, metadata, created_at, "
            "in_progress_at, expires_at, finalizing_at, completed_at, expired_at, cancelling_at, "
            "cancelled_at, output_file_id, error_file_id, total, completed, failed FROM batches "
            "WHERE (? IS NULL OR seq < (SELECT seq FROM batches WHERE id = ?)) ORDER BY seq DESC LIMIT ?",
            (after, after, limit + 1),
        ).fetchall()
        return [_batch(r) for r in rows[:limit]], len(rows) > limit

    def cancel(self, batch_id: str) -> BatchRecord:
        """Fail the batch's unfinished requests (``batch_cancelled``) and end it with what it has."""
        with self._tx():
            status = self._status(batch_id)
            if not batch_may_move(status, "cancelling"):
                raise Conflict(f"batch {batch_id!r} is {status}; only a batch in progress can be cancelled")
            now = self.clock()
            self._set_status(batch_id, status, "cancelling", now)
            self._fail_unfinished(batch_id, CANCELLED, now)
            self._materialize(batch_id, now)
            self._set_status(batch_id, "cancelling", "cancelled", now)
        return self.batch(batch_id)

    def expire(self) -> list[str]:
        """End every batch in progress past its completion window (``batch_expired``)."""
        now = self.clock()
        due = [
            r[0]
            for r in self._db.execute(
                "SELECT id FROM batches WHERE status = 'in_progress' AND expires_at <= ?", (now,)
            )
        ]
        for batch_id in due:
            with self._tx():
                if self._status(batch_id) != "in_progress":
                    continue
                self._fail_unfinished(batch_id, EXPIRED, now)
                self._materialize(batch_id, now)
                self._set_status(batch_id, "in_progress", "expired", now)
        return due

    def sweep(self) -> tuple[int, int]:
        """Delete expired files, and batches finished longer than the retention ago (with their
        requests). Returns how many of each."""
        now = self.clock()
        with self._tx():
            files = self._db.execute(
                "DELETE FROM files WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,)
            ).rowcount
            old = [
                r[0]
                for r in self._db.execute(
                    "SELECT id FROM batches WHERE status IN ('completed', 'expired', 'cancelled', 'failed') "
                    "AND COALESCE(completed_at, expired_at, cancelled_at, created_at) <= ?",
                    (now - self.retention_s,),
                )
            ]
            for batch_id in old:
                self._db.execute("DELETE FROM items WHERE batch_id = ?", (batch_id,))
                self._db.execute("DELETE FROM batches WHERE id = ?", (batch_id,))
        return files, len(old)

    # -- items -----------------------------------------------------------------------------------
    def next_items(
        self, states: Sequence[ItemState], limit: int, exclude: frozenset[tuple[str, int]] = frozenset()
    ) -> list[Item]:
        """Unfinished requests of batches in progress, oldest batch first, in file order."""
        if not states or limit < 1:
            return []
        wanted = (*states, *states)[:2]  # one or both unfinished states
        rows = self._db.execute(
            "SELECT i.batch_id, i.idx, i.custom_id, i.url, i.body, i.state, i.attempts FROM items i "
            "JOIN batches b ON b.id = i.batch_id WHERE i.state IN (?, ?) AND b.status = 'in_progress' "
            "ORDER BY b.seq, i.idx LIMIT ?",
            (*wanted, limit + len(exclude)),
        ).fetchall()
        items = [_item(r) for r in rows]
        return [i for i in items if i.key not in exclude][:limit]

    def item(self, batch_id: str, index: int) -> Item:
        row = self._db.execute(
            "SELECT batch_id, idx, custom_id, url, body, state, attempts FROM items "
            "WHERE batch_id = ? AND idx = ?",
            (batch_id, index),
        ).fetchone()
        if row is None:
            raise NotFound(f"no request {index} in batch {batch_id!r}")
        return _item(row)

    def move(self, item: Item, to: ItemState) -> bool:
        """An unfinished request to another unfinished state; False if it is no longer in
        ``item.state`` (finished or moved meanwhile)."""
        if to in FINISHED or not item_may_move(item.state, to):
            raise ValueError(f"a request cannot go from {item.state} to {to} this way")
        with self._tx():
            cur = self._db.execute(
                "UPDATE items SET state = ?, updated_at = ?, attempts = attempts + 1 "
                "WHERE batch_id = ? AND idx = ? AND state = ?",
                (to, self.clock(), item.batch_id, item.index, item.state),
            )
            return cur.rowcount == 1

    def requeue_local(self) -> int:
        """Every request waiting for the cloud back to pending_local (the policy became local_only)."""
        with self._tx():
            return int(
                self._db.execute(
                    "UPDATE items SET state = ?, updated_at = ? WHERE state = ?",
                    (ItemState.PENDING_LOCAL, self.clock(), ItemState.WAITING_CLOUD),
                ).rowcount
            )

    def finish(self, item: Item, line: BatchOutputLine, *, served_by: str | None) -> bool:
        """Record the request's one result: done when it has a 2xx response, else failed. False
        (and nothing written) when it was final already. The batch's last result completes it."""
        ok = line.response is not None and line.response.status_code < 300 and line.error is None
        state = ItemState.DONE if ok else ItemState.FAILED
        now = self.clock()
        with self._tx():
            row = self._db.execute(
                "SELECT state FROM items WHERE batch_id = ? AND idx = ?", (item.batch_id, item.index)
            ).fetchone()
            if row is None or not item_may_move(ItemState(row[0]), state):
                return False
            self._db.execute(
                "UPDATE items SET state = ?, result = ?, served_by = ?, finished_at = ?, updated_at = ?, "
                "attempts = attempts + 1 WHERE batch_id = ? AND idx = ?",
                (state, line.model_dump_json(), served_by, now, now, item.batch_id, item.index),
            )
            self._db.execute(
                "UPDATE batches SET completed = completed + ?, failed = failed + ? WHERE id = ?",
                (int(ok), int(not ok), item.batch_id),
            )
            self._complete_if_done(item.batch_id, now)
        return True

    def unfinished(self) -> dict[str, int]:
        """Requests of batches in progress by state (for /v1/agent)."""
        rows = self._db.execute(
            "SELECT i.state, COUNT(*) FROM items i JOIN batches b ON b.id = i.batch_id "
            "WHERE b.status = 'in_progress' AND i.state IN (?, ?) GROUP BY i.state",
            UNFINISHED,
        ).fetchall()
        counts = {str(s): 0 for s in UNFINISHED}
        counts.update({state: int(n) for state, n in rows})
        return counts

    def results(self, batch_id: str) -> list[tuple[int, str, float | None, str | None]]:
        """(index, state, finished_at, served_by) of each request, for tests and diagnostics."""
        rows = self._db.execute(
            "SELECT idx, state, finished_at, served_by FROM items WHERE batch_id = ? ORDER BY idx",
            (batch_id,),
        ).fetchall()
        return [(int(i), str(s), f, b) for i, s, f, b in rows]

    # -- inside a transaction --------------------------------------------------------------------
    def _status(self, batch_id: str) -> BatchStatus:
        row = self._db.execute("SELECT status FROM batches WHERE id = ?", (batch_id,)).fetchone()
        if row is None:
            raise NotFound(f"no batch {batch_id!r}", param="batch_id")
        status: BatchStatus = row[0]
        return status

    def _set_status(self, batch_id: str, old: BatchStatus, new: BatchStatus, now: float) -> None:
        if not batch_may_move(old, new):
            raise ValueError(f"a batch cannot go from {old} to {new}")
        self._db.execute(_SET_STATUS[new], (new, now, batch_id, old))

    def _complete_if_done(self, batch_id: str, now: float) -> None:
        row = self._db.execute(
            "SELECT status, total, completed, failed FROM batches WHERE id = ?", (batch_id,)
        ).fetchone()
        if row is None or row[0] != "in_progress" or row[2] + row[3] < row[1]:
            return
        self._set_status(batch_id, "in_progress", "finalizing", now)
        self._materialize(batch_id, now)
        self._set_status(batch_id, "finalizing", "completed", now)

    def _fail_unfinished(self, batch_id: str, error: BatchLineError, now: float) -> None:
        rows = self._db.execute(
            "SELECT idx, custom_id FROM items WHERE batch_id = ? AND state IN (?, ?)", (batch_id, *UNFINISHED)
        ).fetchall()
        for index, custom_id in rows:
            line = BatchOutputLine(id=new_id("batch_req_"), custom_id=custom_id, response=None, error=error)
            self._db.execute(
                "UPDATE items SET state = ?, result = ?, finished_at = ?, updated_at = ? "
                "WHERE batch_id = ? AND idx = ?",
                (ItemState.FAILED, line.model_dump_json(), now, now, batch_id, index),
            )
        self._db.execute("UPDATE batches SET failed = failed + ? WHERE id = ?", (len(rows), batch_id))

    def _materialize(self, batch_id: str, now: float) -> None:
        """The batch's output file (answered requests) and error file (the rest), if any."""
        ids: dict[str, str | None] = {}
        for state, column, suffix in (
            (ItemState.DONE, "output_file_id", "output"),
            (ItemState.FAILED, "error_file_id", "error"),
        ):
            results = [
                r[0]
                for r in self._db.execute(
                    "SELECT result FROM items WHERE batch_id = ? AND state = ? ORDER BY idx",
                    (batch_id, state),
                )
            ]
            if results:
                content = ("\n".join(results) + "\n").encode()
                ids[column] = self._add_file(f"{batch_id}_{suffix}.jsonl", "batch_output", content, now).id
            else:
                ids[column] = None
        self._db.execute(
            "UPDATE batches SET output_file_id = ?, error_file_id = ? WHERE id = ?",
            (ids["output_file_id"], ids["error_file_id"], batch_id),
        )


def _batch(row: tuple[Any, ...]) -> BatchRecord:
    values = list(row)
    values[5] = json.loads(values[5]) if values[5] is not None else None
    return BatchRecord(*values)


def _item(row: tuple[Any, ...]) -> Item:
    batch_id, index, custom_id, url, body, state, attempts = row
    return Item(batch_id, int(index), custom_id, url, json.loads(body), ItemState(state), int(attempts))
