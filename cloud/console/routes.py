"""The console's pages (``/ui``): server-rendered Jinja templates; ``static/console.js`` refreshes
the parts marked ``data-live`` in place, asks for confirmations and counts matching devices.

Every page acts for the tenant of the signed-in key. Reads and writes go through the same
``ControlPlane`` operations as the REST API, so the console can do nothing the API refuses.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import yaml
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from fastapi.types import DecoratedCallable
from pydantic import ValidationError
from starlette.datastructures import FormData

from cloud.console.charts import svg, telemetry_charts
from cloud.console.fleet_table import PER_PAGE, STATUSES, FleetPage, FleetQuery, fleet_page
from cloud.console.sessions import (
    COOKIE,
    LOGIN_COOKIE,
    NOTICE_COOKIE,
    ConsoleSession,
    ConsoleSessions,
    same_secret,
)
from cloud.plane.api import RolloutBody
from cloud.plane.fleet import Selector
from cloud.plane.service import ControlPlane
from cloud.plane.store import utcnow
from cloud.plane.views import model_view
from shared.edge_config import EdgeConfig
from shared.errors import AutoGLMError, ContractError, Forbidden, NotFound, RequestError, http_error

HERE = Path(__file__).resolve().parent
templates = Jinja2Templates(directory=str(HERE / "templates"))
router = APIRouter(prefix="/ui", include_in_schema=False)


def get_page(path: str) -> Callable[[DecoratedCallable], DecoratedCallable]:
    """A GET page that answers HEAD too (FastAPI's ``get`` refuses HEAD with a 405, which link
    checkers and uptime probes send); the server sends a HEAD's headers without the body."""
    return router.api_route(path, methods=["GET", "HEAD"])


ACTIONS = ("pause", "resume", "abort", "rollback")
COMMANDS = ("ping", "reload", "rollback")
# Rollout states in which each button makes sense (the API refuses the others with a reason).
ACTION_STATES = {
    "pause": ("running",),
    "resume": ("paused",),
    "abort": ("running", "paused"),
    "rollback": ("running", "paused", "halted", "completed", "aborted"),
}


class SignInRequired(Exception):
    """No live session: a page answers with a redirect to the sign-in form."""


class CsrfRefused(Exception):
    """A state-changing form came without this session's CSRF token."""


def _plane(request: Request) -> ControlPlane:
    plane: ControlPlane = request.app.state.plane
    return plane


def _sessions(request: Request) -> ConsoleSessions:
    sessions: ConsoleSessions | None = getattr(request.app.state, "console_sessions", None)
    if sessions is None:
        plane = _plane(request)
        sessions = ConsoleSessions(plane.engine, plane.keys, plane.settings.console.session_ttl_s)
        request.app.state.console_sessions = sessions
    return sessions


async def _session(request: Request) -> ConsoleSession:
    session = await asyncio.to_thread(_sessions(request).resolve, request.cookies.get(COOKIE))
    if session is None:
        raise SignInRequired
    return session


async def _checked_form(request: Request, session: ConsoleSession) -> FormData:
    form = await request.form()
    token = form.get("csrf_token")
    if not session.csrf_ok(token if isinstance(token, str) else None):
        raise CsrfRefused
    return form


def _text(form: FormData, name: str, default: str = "") -> str:
    value = form.get(name, default)
    return value.strip() if isinstance(value, str) else default


def _page(
    request: Request, template: str, session: ConsoleSession | None, status: int = 200, **context: Any
) -> HTMLResponse:
    settings = _plane(request).settings.console
    context.update(
        session=session,
        refresh_ms=int(settings.refresh_s * 1000),
        ago=_ago,
        notice=unquote(request.cookies.get(NOTICE_COOKIE, "")) or None,
    )
    response = templates.TemplateResponse(request, template, context, status_code=status)
    if NOTICE_COOKIE in request.cookies and request.method != "HEAD":
        # A HEAD (a link preview with the browser's cookies) shows nothing: it must not eat it.
        response.delete_cookie(NOTICE_COOKIE, path="/ui")
    return response


def _secure(request: Request) -> bool:
    """Secure cookies when configured, and whenever the console is reached over HTTPS."""
    return _plane(request).settings.console.secure_cookie or request.url.scheme == "https"


def _ago(when: datetime | str | None) -> str:
    if when is None:
        return "never"
    if isinstance(when, str):
        when = datetime.fromisoformat(when)
    s = (utcnow() - when).total_seconds()
    if s < 1:
        return "just now"
    if s < 90:
        return f"{s:.0f} s ago"
    if s < 5400:
        return f"{s / 60:.0f} min ago"
    if s < 172800:
        return f"{s / 3600:.0f} h ago"
    return f"{s / 86400:.0f} d ago"


NOTICE_BYTES = 1000  # at most 3,000 characters once percent-encoded


def _see(path: str, notice: str | None = None) -> RedirectResponse:
    response = RedirectResponse(path, status_code=303)
    if notice:
        # Cut by UTF-8 bytes, not characters: percent-encoded, 500 four-byte characters made a
        # cookie over the 4 KiB browsers keep, and the notice silently vanished.
        short = notice.encode()[:NOTICE_BYTES].decode(errors="ignore")
        response.set_cookie(
            NOTICE_COOKIE, quote(short), max_age=60, httponly=True, samesite="strict", path="/ui"
        )
    return response


# -- sign-in ---------------------------------------------------------------------------------------
@get_page("")
@get_page("/")
async def home() -> RedirectResponse:
    return _see("/ui/fleet")


def _login_form(
    request: Request, error: str | None = None, status: int = 200, nxt: str | None = None
) -> HTMLResponse:
    token = secrets.token_urlsafe(24)
    nxt = request.query_params.get("next", "") if nxt is None else nxt
    response = _page(request, "login.html", None, status, login_token=token, error=error, next=nxt)
    if request.method == "HEAD":
        return response  # no form is shown: an open sign-in form's token must stay the one it holds
    response.set_cookie(
        LOGIN_COOKIE,
        token,
        max_age=3600,
        httponly=True,
        samesite="strict",
        secure=_secure(request),
        path="/ui",
    )
    return response


@get_page("/login")
async def login_page(request: Request) -> HTMLResponse:
    return _login_form(request)


@router.post("/login")
async def login(request: Request) -> Response:
    form = await request.form()
    submitted = form.get("login_token")
    nxt = _text(form, "next")
    if not same_secret(request.cookies.get(LOGIN_COOKIE), submitted if isinstance(submitted, str) else None):
        return _login_form(
            request, "The sign-in form expired or came from elsewhere; please try again.", 403, nxt
        )
    sessions = _sessions(request)
    try:
        token, _ = await asyncio.to_thread(sessions.sign_in, _text(form, "api_key"))
    except RequestError as exc:
        return _login_form(request, exc.message, exc.status, nxt)
    # A sign-in replaces the browser's earlier session, which ends now rather than at its expiry.
    await asyncio.to_thread(sessions.sign_out, request.cookies.get(COOKIE))
    target = nxt if nxt.startswith("/ui/") and not nxt.startswith("/ui//") else "/ui/fleet"
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        COOKIE,
        token,
        max_age=int(_plane(request).settings.console.session_ttl_s),
        httponly=True,
        samesite="strict",
        secure=_secure(request),
        path="/ui",
    )
    response.delete_cookie(LOGIN_COOKIE, path="/ui")
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    try:
        session = await _session(request)
    except SignInRequired:
        session = None  # already ended (expired, key revoked): only the cookie is left to clear
    if session is not None:
        await _checked_form(request, session)
        await asyncio.to_thread(_sessions(request).sign_out, request.cookies.get(COOKIE))
    response = _see("/ui/login")
    response.delete_cookie(COOKIE, path="/ui")
    return response


# -- fleet -----------------------------------------------------------------------------------------
@get_page("/fleet")
async def fleet(request: Request) -> HTMLResponse:
    started = time.perf_counter()
    session = await _session(request)
    plane = _plane(request)
    error = None
    try:
        query = FleetQuery.parse(request.query_params)
    except ContractError as exc:
        query, error = FleetQuery(), exc.message
    tenant = session.principal.tenant

    def read() -> FleetPage:
        page = fleet_page(plane.fleet.summaries(tenant), query)
        return replace(page, rows=plane.fleet.with_reports(tenant, page.rows))

    page = await asyncio.to_thread(read)
    response = _page(
        request,
        "fleet.html",
        session,
        400 if error else 200,
        page=page,
        query=query,
        error=error,
        statuses=STATUSES,
        per_page_options=PER_PAGE,
    )
    # The server's own time for the page (bench/console_fleet.py reads it).
    response.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - started) * 1000:.2f}"
    return response


@get_page("/devices/{device_id}")
async def device(device_id: str, request: Request) -> HTMLResponse:
    session = await _session(request)
    plane = _plane(request)
    tenant = session.principal.tenant
    try:
        dev = await asyncio.to_thread(plane.fleet.get, tenant, device_id)
    except NotFound:
        return _page(request, "error.html", session, 404, message=f"No device {device_id!r} in this tenant.")
    events, rows = await asyncio.gather(
        asyncio.to_thread(plane.fleet.events, tenant, device_id, 100),
        asyncio.to_thread(plane.fleet.telemetry_rows, tenant, device_id, utcnow() - timedelta(hours=1)),
    )
    reported = dev.reported or {}
    try:
        effective: dict[str, Any] | None = EdgeConfig.parse(dev.desired_config).model_dump(mode="json")
    except ContractError:
        effective = None
    charts = [(c.title, svg(c)) for c in telemetry_charts(rows, utcnow())]
    return _page(
        request,
        "device.html",
        session,
        device=dev,
        view=dev.public(),
        reported=reported,
        events=events,
        charts=charts,
        requests_hour=len(rows),
        effective_yaml=yaml.safe_dump(effective, sort_keys=True) if effective is not None else None,
        desired_yaml=yaml.safe_dump(dev.desired_config, sort_keys=True) if dev.desired_config else "{}",
        commands=COMMANDS,
    )


@router.post("/devices/{device_id}/command")
async def device_command(device_id: str, request: Request) -> Response:
    session = await _session(request)
    form = await _checked_form(request, session)
    action = _text(form, "action")
    plane = _plane(request)
    path = f"/ui/devices/{quote(device_id)}"
    if action not in COMMANDS:
        return _see(path, f"unknown command {action!r}")
    try:
        await asyncio.to_thread(plane.fleet.get, session.principal.tenant, device_id)
        # Bounded: with the broker down the command waits for a connection that may not come.
        async with asyncio.timeout(10):
            _, reply = await plane.command(session.principal.tenant, device_id, action, 5.0)
    except AutoGLMError as exc:
        return _see(path, f"{action}: {exc.message}")
    except TimeoutError:
        return _see(path, f"{action} not sent: no connection to the broker now")
    if reply is None:
        return _see(path, f"{action} sent; no answer within 5 s (an offline device gets it when back)")
    return _see(
        path, f"{action}: {'ok' if reply.ok else 'refused'}{' — ' + reply.detail if reply.detail else ''}"
    )


# -- models ----------------------------------------------------------------------------------------
async def _models(plane: ControlPlane, tenant: str) -> list[dict[str, Any]]:
    def read() -> list[dict[str, Any]]:
        using = plane.rollouts.models_in_use(tenant)
        out = []
        for entry in plane.registry(tenant).list():
            view = model_view(entry)
            view["chunks"] = sum(f.blob.chunk_count for f in entry.manifest.files)
            view["files"] = len(entry.manifest.files)
            view["in_use"] = using.get((entry.name, entry.version), [])
            out.append(view)
        return out

    return await asyncio.to_thread(read)


@get_page("/models")
async def models(request: Request) -> HTMLResponse:
    session = await _session(request)
    found = await _models(_plane(request), session.principal.tenant)
    return _page(request, "models.html", session, models=found, error=None)


@router.post("/models/{name}/{version}/delete")
async def delete_model(name: str, version: str, request: Request) -> Response:
    session = await _session(request)
    await _checked_form(request, session)
    plane = _plane(request)
    try:
        if not session.principal.allows("admin"):
            raise Forbidden("deleting a model needs an admin key; you signed in with an operator key")
        freed = await asyncio.to_thread(plane.delete_model, session.principal.tenant, name, version)
    except AutoGLMError as exc:
        found = await _models(plane, session.principal.tenant)
        error = f"{name}:{version} was not deleted: {exc.message}"
        return _page(request, "models.html", session, http_error(exc).status, models=found, error=error)
    return _see("/ui/models", f"deleted {name}:{version} ({freed / 1e6:.1f} MB freed)")


# -- rollouts --------------------------------------------------------------------------------------
_FORM_DEFAULTS = {
    "model": "",
    "selector": "",
    "waves": "10, 50, 100",
    "failure_threshold": "20",
    "health_window_s": "60",
    "wave_timeout_s": "900",
    "max_concurrent": "100",
    "max_error_rate": "5",
    "max_latency_ratio": "3",
    "min_samples": "0",
    "max_eval_drop": "5",
    "allow_downgrade": "",
}


async def _rollouts_page(
    request: Request,
    session: ConsoleSession,
    values: dict[str, str] | None = None,
    errors: dict[str, str] | None = None,
    status: int = 200,
) -> HTMLResponse:
    plane = _plane(request)
    tenant = session.principal.tenant
    listed, found = await asyncio.gather(
        asyncio.to_thread(plane.rollouts.list, tenant), _models(plane, tenant)
    )
    return _page(
        request,
        "rollouts.html",
        session,
        status,
        rollouts=list(reversed(listed)),
        models=found,
        values=values or _FORM_DEFAULTS,
        errors=errors or {},
    )


@get_page("/rollouts")
async def rollouts(request: Request) -> HTMLResponse:
    session = await _session(request)
    return await _rollouts_page(request, session)


@get_page("/rollouts/match-count")
async def match_count(request: Request, selector: str = "") -> JSONResponse:
    """How many devices a selector matches now (the create form shows it as the operator types)."""
    try:
        session = await _session(request)
    except SignInRequired:
        return JSONResponse({"error": "signed out"}, status_code=401)
    try:
        parsed = Selector.parse(selector)
    except ContractError as exc:
        return JSONResponse({"error": exc.message}, status_code=400)
    # The fleet table's columns (labels and status), not every device's full report.
    rows = await asyncio.to_thread(_plane(request).fleet.summaries, session.principal.tenant)
    found = [d for d in rows if parsed.matches(d.labels)]
    return JSONResponse({"count": len(found), "online": sum(1 for d in found if d.status == "online")})


def _percent(value: str, field: str, errors: dict[str, str]) -> float | None:
    try:
        return float(value) / 100.0
    except ValueError:
        errors[field] = "a number (percent)"
        return None


@router.post("/rollouts")
async def create_rollout(request: Request) -> Response:
    session = await _session(request)
    form = await _checked_form(request, session)
    values = {k: _text(form, k, "") for k in _FORM_DEFAULTS}
    errors: dict[str, str] = {}
    try:
        waves = [float(w) for w in values["waves"].replace(" ", "").split(",") if w]
    except ValueError:
        waves = []
        errors["waves"] = "comma-separated percentages, e.g. 10, 50, 100"
    body: dict[str, Any] = {
        "model": values["model"],
        "selector": values["selector"],
        "waves": waves,
        "failure_threshold": _percent(values["failure_threshold"], "failure_threshold", errors),
        "max_error_rate": _percent(values["max_error_rate"], "max_error_rate", errors),
        "health_window_s": values["health_window_s"],
        "wave_timeout_s": values["wave_timeout_s"],
        "max_concurrent": values["max_concurrent"],
        "max_latency_ratio": values["max_latency_ratio"],
        "min_samples": values["min_samples"],
        "max_eval_drop": _percent(values["max_eval_drop"], "max_eval_drop", errors),
        "allow_downgrade": bool(values["allow_downgrade"]),
    }
    if not values["model"]:
        errors["model"] = "choose a model"
    if not errors:
        try:
            parsed = RolloutBody.model_validate(body)
            fields = parsed.model_dump(exclude={"model", "waves"})
            created = await asyncio.to_thread(
                _plane(request).create_rollout, session.principal.tenant, parsed.model, parsed.waves, **fields
            )
            return _see(f"/ui/rollouts/{created['rollout_id']}", "rollout started")
        except ValidationError as exc:
            for e in exc.errors():
                errors[str(e["loc"][0]) if e["loc"] else "form"] = e["msg"]
        except RequestError as exc:
            errors[str(exc.context.get("param") or _field_of(exc))] = exc.message
        except AutoGLMError as exc:
            errors["form"] = exc.message
    return await _rollouts_page(request, session, values, errors, 400)


def _field_of(exc: AutoGLMError) -> str:
    for field in ("selector", "model", "waves"):
        if field in exc.context or field in exc.message:
            return field
    return "form"


@get_page("/rollouts/{rollout_id}")
async def rollout(rollout_id: str, request: Request) -> HTMLResponse:
    session = await _session(request)
    try:
        view = await asyncio.to_thread(_plane(request).rollouts.show, session.principal.tenant, rollout_id)
    except NotFound:
        return _page(
            request, "error.html", session, 404, message=f"No rollout {rollout_id!r} in this tenant."
        )
    return _page(request, "rollout.html", session, r=view, actions=ACTIONS, action_states=ACTION_STATES)


@router.post("/rollouts/{rollout_id}/{action}")
async def rollout_action(rollout_id: str, action: str, request: Request) -> Response:
    session = await _session(request)
    await _checked_form(request, session)
    path = f"/ui/rollouts/{quote(rollout_id)}"
    if action not in ACTIONS:
        return _see(path, f"unknown action {action!r}")
    fn = getattr(_plane(request).rollouts, action)
    try:
        view = await asyncio.to_thread(fn, session.principal.tenant, rollout_id)
    except AutoGLMError as exc:
        return _see(path, f"{action} refused: {exc.message}")
    return _see(path, f"{action}: the rollout is {view['state']}")


# -- config ----------------------------------------------------------------------------------------
@get_page("/config")
async def config_page(request: Request) -> HTMLResponse:
    session = await _session(request)
    return _page(
        request, "config.html", session, values={"selector": "", "config": ""}, errors={}, pushed=None
    )


@router.post("/config")
async def push_config(request: Request) -> Response:
    session = await _session(request)
    form = await _checked_form(request, session)
    values = {"selector": _text(form, "selector"), "config": _text(form, "config")}
    errors: dict[str, str] = {}
    config: Any = None
    try:
        config = yaml.safe_load(values["config"]) if values["config"] else {}
    except (yaml.YAMLError, ValueError, RecursionError) as exc:  # a bad date, nesting too deep
        errors["config"] = f"not YAML or JSON: {exc}"[:2000]
    if not errors and not isinstance(config, dict):
        errors["config"] = "the config is a mapping of settings (see shared/edge_config.py)"
    if not errors:
        try:
            pushed = await _plane(request).push_config(session.principal.tenant, values["selector"], config)
            return _page(request, "config.html", session, values=values, errors={}, pushed=pushed)
        except AutoGLMError as exc:
            errors["selector" if "selector" in exc.context else "config"] = exc.message
    return _page(request, "config.html", session, 400, values=values, errors=errors, pushed=None)


# Last, so that every page above is matched first (the static files are mounted before the router).
@get_page("/{path:path}")
async def no_such_page(path: str, request: Request) -> HTMLResponse:
    """A console address that is no page: the console's own 404 page, not the API's JSON."""
    return _page(request, "error.html", None, 404, message=f"No page /ui/{path} in the console.")
