"""Generation output handed from the thread that runs the model to the event loop serving the request.

The edge's model host and the pool's batching engine both generate on a thread of their own; the
request's coroutine reads text deltas, then one :class:`GenerationResult`, from this channel.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable

from edge_agent.runtime.generator import GenerationResult, StreamItem

Item = StreamItem | BaseException


class GenerationChannel:
    """Created on the event loop; ``put`` from any thread, ``items`` on the loop."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Item] = asyncio.Queue()
        # Set when the reader stops reading (the client went away): the generator should stop.
        self.cancelled = threading.Event()

    def put(self, item: Item) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the request's event loop is gone: nobody is listening any more
            self.cancelled.set()

    async def items(self, finished: Awaitable[None] | None = None) -> AsyncIterator[StreamItem]:
        """Text deltas, then the result; an exception put by the generator is raised here.

        ``finished`` (the generating task, say) is awaited after the result, before returning."""
        try:
            while True:
                item = await self._queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, GenerationResult):
                    if finished is not None:
                        await finished
                    return
        finally:
            self.cancelled.set()
