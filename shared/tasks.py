"""Background asyncio tasks that are neither lost nor silent.

The event loop keeps only weak references to tasks: one nobody holds may be collected before it
finishes. And a long-lived loop that dies takes its reason with it unless someone looks:
``watch`` logs it (with the traceback) the moment it happens, and ``exit_reason`` gives it to
the readiness probes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Coroutine
from typing import Any


def exit_reason(task: asyncio.Task[Any]) -> str | None:
    """Why a finished task ended ("cancelled", the exception, or "returned"); None if running."""
    if not task.done():
        return None
    if task.cancelled():
        return "cancelled"
    exc = task.exception()
    if exc is None:
        return "returned"
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(f"{type(e).__name__}: {e}" for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


def watch(task: asyncio.Task[Any], log: logging.Logger, what: str) -> asyncio.Task[Any]:
    """Log at ERROR, with the traceback, when ``task`` ends with an exception."""

    def done(t: asyncio.Task[Any]) -> None:
        if not t.cancelled() and t.exception() is not None:
            log.error("%s stopped: %s", what, exit_reason(t), exc_info=t.exception())

    task.add_done_callback(done)
    return task


@contextlib.asynccontextmanager
async def background(
    coro: Coroutine[Any, Any, Any], log: logging.Logger, what: str, name: str
) -> AsyncIterator[asyncio.Task[Any]]:
    """A long-lived loop for the length of the block (a FastAPI lifespan): watched while it runs,
    cancelled and awaited when the block ends, whatever it died of meanwhile."""
    task = watch(asyncio.create_task(coro, name=name), log, what)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


class TaskSet:
    """Fire-and-forget tasks held until they finish; their failures are logged."""

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return watch(task, self.log, f"background task {name!r}")

    def __len__(self) -> int:
        return len(self._tasks)

    async def cancel_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
