"""A cap on request bodies, so one huge request cannot take the agent's memory and event loop.

Bodies that announce a larger Content-Length are refused before a byte is read; chunked bodies
are counted as they arrive. Either way the client gets 413 in the OpenAI error envelope.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edge_agent.serving.errors import error_for
from shared.errors import RequestTooLarge

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self) -> str:
        return f"request body larger than {self.max_bytes} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await error_for(RequestTooLarge(self._message()))(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # FastAPI turns other errors raised while it reads the body into a 400.
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, counted, send)
