"""The agent's data folder: held by one agent at a time, and its databases kept usable.

Two agents on one folder would share its state file, outbox and partial downloads, and knock
each other off the broker with the same client id: the folder is claimed with an exclusive
``flock`` on ``agent.lock`` (released by the kernel when the process dies, however it dies). A
database the disk damaged is set aside and started afresh rather than stopping the agent on
every start: what it held (telemetry not sent yet, batch jobs) is lost either way, but the model
keeps serving.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from shared.errors import ConfigError

log = logging.getLogger(__name__)

LOCK_FILE = "agent.lock"
# What SQLite says of a file that is not a database, or one whose pages are damaged.
_DAMAGED = frozenset({"SQLITE_CORRUPT", "SQLITE_NOTADB"})
T = TypeVar("T")


class DataDir:
    """A claim on the data folder; ``release`` (or the process ending) gives it up."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def claim(cls, path: Path) -> DataDir:
        """ConfigError when ``path`` is not a folder this process may write, or another agent
        holds it."""
        try:
            path.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:
            raise ConfigError("data_dir is not a folder", path=str(path)) from exc
        except OSError as exc:
            raise ConfigError(f"data_dir cannot be created: {exc.strerror}", path=str(path)) from exc
        lock = path / LOCK_FILE
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:  # read-only file system, no permission
            raise ConfigError(f"data_dir cannot be written: {exc.strerror}", path=str(path)) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(f"data_dir is in use by another agent (pid {holder})", path=str(path)) from exc
        # On a full disk the pid is not written: it only informs the next agent's refusal.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the lock
            self._fd = None


def open_database(path: Path, open_db: Callable[[], T], what: str) -> T:
    """``open_db()``; when SQLite finds ``path`` damaged (not a database, a malformed image),
    the file and its journal are set aside under a name of their own and a fresh one opened."""
    try:
        return open_db()
    except sqlite3.DatabaseError as exc:
        if getattr(exc, "sqlite_errorname", None) not in _DAMAGED:
            # Locked, read-only, full, a bug: not the file's fault, and not a reason to lose it.
            raise ConfigError(f"the {what} cannot be opened: {exc}", path=str(path)) from exc
        aside = f".corrupt-{time.time_ns()}"
        for suffix in ("", "-wal", "-shm"):
            part = path.with_name(path.name + suffix)
            if part.exists():
                part.replace(part.with_name(part.name + aside))
        log.error(
            "the %s %s is damaged (%s); set aside as %s%s, starting a new one",
            what,
            path,
            exc,
            path.name,
            aside,
        )
        return open_db()
