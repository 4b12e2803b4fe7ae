"""The one place errors become HTTP answers in the OpenAI error envelope.

Status, OpenAI ``type`` and ``code`` come from ``shared.errors.HTTP_ERRORS`` (by exception
class); the edge's local API, the pool, the gateway and the control plane all install these
handlers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.errors import AutoGLMError, RequestError, http_error
from shared.openai_api import ErrorEnvelope

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    """An answer for errors that are not ours (validation, routing): typed by status."""
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    # A chunked body past the cap is refused while it is read (an HTTPException, not ours):
    # the same code as one refused by its Content-Length.
    code = code or ("request_too_large" if status == 413 else None)
    return JSONResponse(ErrorEnvelope.of(message, kind, param, code), status_code=status)


def invalid_request(errors: Sequence[Any]) -> JSONResponse:
    """400 for a request that failed validation, from pydantic's (FastAPI's) error list: the
    first error, its location with the ``body``/``query``/``path`` prefix dropped."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        # FastAPI puts the character position where a field name would be: no ``param``.
        at = [p for p in first.get("loc", ()) if isinstance(p, int)]
        where = f" at character {at[0]}" if at else ""
        return error_response(400, f"the body is not valid JSON{where}: {first.get('msg')}")
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
    # OpenAI's ``param`` names the request field; the message keeps the full path for humans.
    return error_response(400, f"{'.'.join(loc) or 'body'}: {first.get('msg')}", loc[0] if loc else None)


def error_for(exc: AutoGLMError) -> JSONResponse:
    """The answer ``HTTP_ERRORS`` gives ``exc``, with ``param`` and Retry-After where it has them."""
    http = http_error(exc)
    response = JSONResponse(_envelope(exc), status_code=http.status)
    if isinstance(exc, RequestError) and exc.retry_after_s is not None:
        response.headers["Retry-After"] = str(exc.retry_after_s)
    return response


def _envelope(exc: AutoGLMError) -> dict[str, Any]:
    http = http_error(exc)
    if isinstance(exc, RequestError):
        # A request error's message is written for the client; other errors keep their context.
        return ErrorEnvelope.of(exc.message, http.type, exc.param, http.code)
    return ErrorEnvelope.of(str(exc), http.type, None, http.code)


def error_event(exc: Exception) -> str:
    """A server-sent event in the error envelope, for a stream that fails after its 200 went out:
    the client reads why instead of a connection that just ends (no ``[DONE]`` follows it)."""
    if isinstance(exc, AutoGLMError):
        body = _envelope(exc)
    else:
        body = ErrorEnvelope.of(f"internal error: {type(exc).__name__}", "server_error")
    return "data: " + json.dumps(body, ensure_ascii=False) + "\n\n"


def answer_for(exc: AutoGLMError) -> JSONResponse:
    """``error_for``, logging the server-side failures (a client's mistake is not logged)."""
    response = error_for(exc)
    if response.status_code >= 500 and not isinstance(exc, RequestError):
        log.error("unexpected %s while serving a request: %s", type(exc).__name__, exc)
    return response


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AutoGLMError)
    async def _ours(_: Request, exc: AutoGLMError) -> JSONResponse:
        return answer_for(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return invalid_request(exc.errors())

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error while serving a request")
        return error_response(500, f"internal error: {type(exc).__name__}")
