"""The operator console at ``/ui``: fleet, models, rollouts and config in a browser, live.

- ``sessions``     sign-in with an operator/admin key: session cookie, CSRF token per session.
- ``fleet_table``  the fleet page's filters, sorting and server-side paging.
- ``charts``       a device's recent telemetry as per-minute series and inline SVG charts.
- ``routes``       the pages and forms (Jinja templates in ``templates/``, assets in ``static/``).

Served by ``autoglm cloud serve`` in the control plane's own process (``install``); nothing to
build, nothing fetched from elsewhere.
"""

from __future__ import annotations

from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cloud.console.routes import HERE, CsrfRefused, SignInRequired, router, templates

# Scripts and styles only from the console itself: an injected <script> does not run.
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


class _SecurityHeaders:
    """Pure ASGI (the gateway's streams pass by untouched): headers on the console's answers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not path.startswith("/ui"):
            await self.app(scope, receive, send)
            return
        extra = [
            (b"content-security-policy", _CSP.encode()),
            (b"x-content-type-options", b"nosniff"),
            (b"referrer-policy", b"same-origin"),
        ]
        if not path.startswith("/ui/static/"):
            extra.append((b"cache-control", b"no-store"))

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _sign_in_required(request: Request, exc: Exception) -> Response:
    if request.method == "GET":
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/ui/login?next={quote(target)}", status_code=303)
    return RedirectResponse("/ui/login", status_code=303)


async def _csrf_refused(request: Request, exc: Exception) -> Response:
    return templates.TemplateResponse(
        request,
        "error.html",
        {
            "session": None,
            "message": "This form was not sent from the console (no valid CSRF token); nothing was changed.",
        },
        status_code=403,
    )


def install(app: FastAPI) -> None:
    """Mount the console on the control plane's app (its lifespan provides ``app.state.plane``)."""
    # The static files first: the router ends with a catch-all 404 page for /ui/...
    app.mount("/ui/static", StaticFiles(directory=str(HERE / "static")), name="console-static")
    app.include_router(router)
    app.add_exception_handler(SignInRequired, _sign_in_required)
    app.add_exception_handler(CsrfRefused, _csrf_refused)
    app.add_middleware(_SecurityHeaders)
