"""``EventStream``: Starlette's StreamingResponse, watching for a client that leaves with one task.

Under ASGI before 2.4 (uvicorn speaks 2.3) a streaming answer must listen for ``http.disconnect``
beside sending, or a client that leaves would not stop the stream (uvicorn drops what is sent
after a disconnect without a word). Starlette does it with an anyio task group per response,
which was a fifth of what the gateway added to a streamed request (issue 17); here one watcher
task cancels the sending when the client leaves.
"""

from __future__ import annotations

import asyncio

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


class EventStream(StreamingResponse):
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        spec = tuple(int(p) for p in scope.get("asgi", {}).get("spec_version", "2.0").split("."))
        task = asyncio.current_task()
        if scope["type"] != "http" or spec >= (2, 4) or task is None:
            # 2.4 servers raise on a send after a disconnect: Starlette needs no watcher there.
            await super().__call__(scope, receive, send)
            return
        finished = left = False

        async def watch() -> None:
            nonlocal left
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
            task.uncancel()  # ours, not the server's: the client left, the response is over
        finally:
            finished = True
            watcher.cancel()
        if self.background is not None:
            await self.background()
