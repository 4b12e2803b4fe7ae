"""The OpenAI-compatible routes, shared by the edge agent and the cloud pool.

A route only parses the request with the shared schemas and hands it to a :class:`Responder`:
the edge's is the fallback router (local model or cloud), the pool's serves its batch engine.
Every answer carries ``X-AutoGLM-Served-By``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from edge_agent.serving.service import SERVED_BY_HEADER, CompletionService, Overflow, ServedModel
from edge_agent.serving.streaming import EventStream, unless_the_client_leaves
from shared.openai_api import ChatCompletionRequest, CompletionRequest, ModelList


class Responder(Protocol):
    def models(self) -> ModelList: ...

    async def completions(self, body: CompletionRequest) -> Response: ...

    async def chat(self, body: ChatCompletionRequest) -> Response: ...


class ServiceResponder:
    """Answers from a CompletionService (a model on this host), labelled with where that is."""

    def __init__(self, service: CompletionService, served_by: str) -> None:
        self.service = service
        self.served_by = served_by

    def models(self) -> ModelList:
        return self.service.models()

    def serving(self) -> ServedModel | None:
        """The model this host serves now (None: none)."""
        return self.service.host.current

    async def completions(self, body: CompletionRequest) -> Response:
        if body.stream:
            return self._events(await self.service.complete_stream(body))
        return self._json(await self.service.complete(body))

    async def chat(self, body: ChatCompletionRequest, overflow: Overflow | None = None) -> Response:
        if body.stream:
            return self._events(await self.service.chat_stream(body, overflow=overflow))
        return self._json(await self.service.chat(body))

    def _json(self, result: Any) -> Response:
        return JSONResponse(result.model_dump(mode="json"), headers={SERVED_BY_HEADER: self.served_by})

    def _events(self, events: Any) -> Response:
        return EventStream(events, media_type="text/event-stream", headers={SERVED_BY_HEADER: self.served_by})


def openai_routes(responder: Callable[[Request], Responder], **router_kwargs: Any) -> APIRouter:
    """``GET /models``, ``POST /completions``, ``POST /chat/completions`` under ``prefix``."""
    router = APIRouter(**router_kwargs)

    @router.get("/models")
    async def models(request: Request) -> ModelList:
        return responder(request).models()

    @router.post("/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        answer = responder(request).completions(body)
        return await (answer if body.stream else cancel_on_disconnect(request, answer))

    @router.post("/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        answer = responder(request).chat(body)
        return await (answer if body.stream else cancel_on_disconnect(request, answer))

    return router


async def cancel_on_disconnect(request: Request, answer: Awaitable[Response]) -> Response:
    """Await a non-streaming answer, cancelling it if the client goes away first
    (:func:`unless_the_client_leaves`)."""
    response = await unless_the_client_leaves(answer, request.receive)
    # Nobody reads a 499; the status is for the access log.
    return Response(status_code=499) if response is None else response


class ServedByHeader:
    """ASGI middleware: a ``/v1`` answer that no model produced (an error, a listing) says
    ``X-AutoGLM-Served-By: none``, so every answer says where it was served."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope.get("path", "").startswith("/v1/"):
            await self.app(scope, receive, send)
            return

        async def label(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(name.lower() == _HEADER_KEY for name, _ in headers):
                    headers.append((_HEADER_KEY, b"none"))
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, label)


_HEADER_KEY = SERVED_BY_HEADER.lower().encode()
