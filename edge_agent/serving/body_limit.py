"""A cap on request bodies, so one huge request cannot take the agent's memory and event loop.

Bodies that announce a larger Content-Length are refused before a byte is read; chunked bodies
are counted as they arrive. Either way the client gets 413 in the OpenAI error envelope. A path
may have its own cap (``per_path``: the edge's file uploads are larger than any request).
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edge_agent.serving.errors import error_for
from shared.errors import RequestTooLarge

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


class BodyLimit:
    def __init__(
        self, app: ASGIApp, max_bytes: int = DEFAULT_MAX_BODY_BYTES, per_path: Mapping[str, int] | None = None
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.per_path = dict(per_path or {})

    def _message(self, limit: int) -> str:
        return f"request body larger than {limit} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.per_path.get(scope.get("path", ""), self.max_bytes)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await error_for(RequestTooLarge(self._message(limit)))(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # FastAPI turns other errors raised while it reads the body into a 400.
                    raise HTTPException(413, self._message(limit))
            return message

        await self.app(scope, counted, send)
