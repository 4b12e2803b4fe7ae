"""Generation output handed from the thread that runs the model to the event loop serving the request.

The edge's model host and the pool's batching engine both generate on a thread of their own; the
request's coroutine reads text deltas, then one :class:`GenerationResult`, from this channel.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Iterable

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
        put_all([(self, item)])

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


def put_all(deliveries: Iterable[tuple[GenerationChannel, Item]]) -> None:
    """Items for several channels (in order per channel), handed to each event loop among them
    once: a decode step's tokens for four streams wake the loop once, not four times; each wake-up
    is a thread on the CPU cores the next step needs."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[GenerationChannel, Item]]] = {}
    for channel, item in deliveries:
        by_loop.setdefault(channel._loop, []).append((channel, item))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_now, batch)
        except RuntimeError:  # the requests' event loop is gone: nobody is listening any more
            for channel, _ in batch:
                channel.cancelled.set()


def _put_now(batch: list[tuple[GenerationChannel, Item]]) -> None:
    for channel, item in batch:
        channel._queue.put_nowait(item)
