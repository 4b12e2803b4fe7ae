"""The fallback gateway's two routes as plain ASGI, in front of FastAPI's routing.

They carry nearly all of a control plane's traffic, and FastAPI's per-request work (solving the
dependencies, validating and re-encoding the body, wrapping the answer) was the largest part of
what the gateway cost a request (issue 17). Here the same checks run in the same order, with the
same answers: the API key (remembered for seconds, ``ApiKeys.authenticate``) and its scope, the
body against the same OpenAI request model (400 naming the field), the tenant's rate limit; then
the client's own bytes go to the pool unchanged (``PoolGateway.forward``). The routes are still
declared in ``cloud.plane.api`` for the OpenAPI document; a request reaches them only when this
middleware is not installed.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, cast

from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from edge_agent.serving.errors import answer_for, error_response, invalid_request
from edge_agent.serving.streaming import unless_the_client_leaves
from shared.errors import AutoGLMError
from shared.openai_api import (
    VERSION_FALLBACK_HEADER,
    ChatCompletionRequest,
    CompletionRequest,
    wants_closest_version,
)

if TYPE_CHECKING:
    from starlette.responses import Response
    from starlette.types import ASGIApp, Receive, Scope, Send

    from cloud.plane.service import ControlPlane

# Request path → (the pool's path, the request's model).
ROUTES: dict[str, tuple[str, type[BaseModel]]] = {
    "/v1/chat/completions": ("/chat/completions", ChatCompletionRequest),
    "/v1/completions": ("/completions", CompletionRequest),
}
_AUTHORIZATION = b"authorization"
_CONTENT_TYPE = b"content-type"
_FALLBACK = VERSION_FALLBACK_HEADER.lower().encode()
# No body at all: a missing field to FastAPI ("Field required"), not an invalid one.
_EMPTY = object()


class GatewayRoutes:
    """ASGI middleware: POSTs to the gateway's paths are answered here; everything else (other
    methods on those paths included, which get FastAPI's 405) goes on to ``app``. Unexpected
    exceptions propagate to Starlette's outermost handler, as a route's would."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = ROUTES.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        try:
            payload = await _read_body(receive)
        except HTTPException as exc:  # BodyLimit's 413 for a chunked body past the cap
            await error_response(exc.status_code, str(exc.detail))(scope, receive, send)
            return
        if payload is None:
            return  # the client left before sending its request
        plane: ControlPlane = scope["app"].state.plane
        try:
            # A non-streaming forward is cancelled when the client leaves, which closes its
            # upstream connection: the pool replica then cancels the generation, as it does for
            # its own clients (it ran to its last token for nobody, holding its batch place).
            response = await unless_the_client_leaves(_answer(plane, route, scope, payload), receive)
        except AutoGLMError as exc:
            response = answer_for(exc)
        if response is None:
            return  # the client left first: its upstream request was cancelled with it
        await response(scope, receive, send)


async def _read_body(receive: Receive) -> bytes | None:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _answer(
    plane: ControlPlane, route: tuple[str, type[BaseModel]], scope: Scope, payload: bytes
) -> Response:
    authorization, content_type, fallback = "", "", ""
    # The first of each, as Starlette's headers.get.
    for name, value in scope["headers"]:
        if name == _AUTHORIZATION and not authorization:
            authorization = value.decode("latin-1")
        elif name == _CONTENT_TYPE and not content_type:
            content_type = value.decode("latin-1")
        elif name == _FALLBACK and not fallback:
            fallback = value.decode("latin-1")
    # FastAPI's order: a body that is not JSON is refused before the key is looked at; one that
    # does not fit the request model, after.
    parsed, refusal = _parsed(payload, _is_json(content_type))
    if refusal is not None:
        return refusal
    who = await plane.keys.authenticate(authorization)
    who.require("inference")
    path, model = route
    if parsed is _EMPTY:
        return invalid_request([{"loc": ("body",), "msg": "Field required"}])
    try:
        model.model_validate(parsed, from_attributes=True)  # as FastAPI validates a body field
    except ValidationError as exc:
        return invalid_request([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()])
    plane.rate_limiter.check(who.tenant)
    body = cast(dict[str, Any], parsed)  # validated: a JSON object
    closest = wants_closest_version(fallback)
    return await plane.gateway.forward(path, body, payload=payload, closest=closest)


def _is_json(content_type: str) -> bool:
    """Whether FastAPI reads a body of this type as JSON: application/json or application/*+json
    (a body sent without a type is not JSON to it either)."""
    main, _, sub = content_type.partition(";")[0].strip().lower().partition("/")
    return main == "application" and (sub == "json" or sub.endswith("+json"))


def _parsed(payload: bytes, is_json: bool) -> tuple[Any, Response | None]:
    """The body as FastAPI hands it to validation (``_EMPTY`` when empty, the bytes when not sent
    as JSON, else parsed with ``json``, as FastAPI does, so that the same texts pass and fail with
    the same message: a lone surrogate, say, reaches the model's own check), or its 400."""
    if not payload:
        return _EMPTY, None
    if not is_json:
        return payload, None
    try:
        return json.loads(payload), None
    except json.JSONDecodeError as exc:
        return None, invalid_request(
            [{"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error"}]
        )
    except Exception:  # not UTF-8 (or -16, -32), nested past the recursion limit
        return None, error_response(400, "There was an error parsing the body")
