"""``EventStream``: Starlette's StreamingResponse, watching for a client that leaves with one task.

Under ASGI before 2.4 (uvicorn speaks 2.3) a streaming answer must listen for ``http.disconnect``
beside sending, or a client that leaves would not stop the stream (uvicorn drops what is sent
after a disconnect without a word). Starlette does it with an anyio task group per response,
which was a fifth of what the gateway added to a streamed request (issue 17); here one watcher
task cancels the sending when the client leaves.

``on_close`` runs however the response ends, even when it is cancelled before its body was ever
started (an async generator that never started does not run its ``finally``): what holds an
upstream connection releases it there.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


class EventStream(StreamingResponse):
    def __init__(
        self, content: Any, *args: Any, on_close: Callable[[], None] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(content, *args, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._respond(scope, receive, send)
        finally:
            closing = getattr(self.body_iterator, "aclose", None)
            if closing is not None:
                await asyncio.shield(closing())
            if self.on_close is not None:
                self.on_close()

    async def _respond(self, scope: Scope, receive: Receive, send: Send) -> None:
        spec = tuple(int(p) for p in scope.get("asgi", {}).get("spec_version", "2.0").split("."))
        task = asyncio.current_task()
        if scope["type"] != "http" or spec >= (2, 4) or task is None:
            # 2.4 servers raise on a send after a disconnect: Starlette needs no watcher there.
            await super().__call__(scope, receive, send)
            return
        finished = left = caught = False

        async def watch() -> None:
            nonlocal left
            # A receive that fails is a client gone as well.
            with contextlib.suppress(Exception):
                while (await receive())["type"] != "http.disconnect":
                    pass
            if not finished:
                # The sender is waiting (the watcher runs only then): the cancel lands in its await.
                left = True
                task.cancel()

        watcher = asyncio.create_task(watch())
        try:
            await self.stream_response(send)
        except asyncio.CancelledError:
            if not left:
                raise
            caught = True
            if task.uncancel() > 0:
                raise  # cancelled from outside too (the server shutting down): that one stands
        finally:
            finished = True
            watcher.cancel()
            if left and not caught:
                task.uncancel()  # the body swallowed our cancel; it must not outlive the response
        if self.background is not None:
            await self.background()


T = TypeVar("T")


async def unless_the_client_leaves(answer: Awaitable[T], receive: Receive) -> T | None:
    """``answer``, or None when the client goes away first (an ``http.disconnect`` from
    ``receive``, the request's body already read): a non-streaming answer is then cancelled, as
    vLLM cancels one, so an abandoned request does not hold the generator (or, through the
    cloud's gateway, its upstream connection and so the pool's). Streams stop by themselves
    when their reader does."""
    work = asyncio.ensure_future(answer)

    async def gone() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not work.done():
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await work
        return None
    return work.result()
