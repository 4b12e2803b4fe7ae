"""The one place HTTP errors become the OpenAI error envelope."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from shared.errors import InferenceError
from shared.openai_api import ErrorEnvelope

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse(ErrorEnvelope.of(message, kind, param, code), status_code=status)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(InferenceError)
    async def _inference(_: Request, exc: InferenceError) -> JSONResponse:
        response = error_response(exc.status, exc.message, exc.param, exc.code)
        if exc.retry_after_s is not None:
            response.headers["Retry-After"] = str(exc.retry_after_s)
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        # OpenAI's ``param`` names the request field; the message keeps the full path for humans.
        return error_response(400, f"{'.'.join(loc) or 'body'}: {first.get('msg')}", loc[0] if loc else None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error while serving a request")
        return error_response(500, f"internal error: {type(exc).__name__}")
