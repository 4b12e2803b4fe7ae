"""REST API of the control plane (``/v1``). Every route acts for the tenant of the caller's key."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import DataError

from cloud.plane.auth import MAX_KEY_LIFETIME_S, MIN_KEY_LIFETIME_S, Principal, Scope
from cloud.plane.fleet import Selector
from cloud.plane.service import ControlPlane
from cloud.plane.views import (
    Catalogue,
    CommandSent,
    ConfigPushed,
    DeviceList,
    DeviceView,
    GatewayState,
    Health,
    KeyCreated,
    KeyList,
    KeyRevoked,
    ModelDeleted,
    ModelDetail,
    Readiness,
    RolloutList,
    RolloutView,
    model_view,
)
from cloud.registry import ModelRegistry
from edge_agent.serving.errors import error_response, install_error_handlers
from shared.errors import NotFound
from shared.openai_api import (
    VERSION_FALLBACK_HEADER,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorEnvelope,
    wants_closest_version,
)
from shared.pool_artifact import POOL_DIGEST_HEADER, SignedPoolArtifact
from shared.tasks import exit_reason


def _plane_of(request: Request) -> ControlPlane:
    plane: ControlPlane = request.app.state.plane
    return plane


async def _plane(request: Request) -> ControlPlane:
    # async: FastAPI runs a plain-def dependency in a worker thread, a hop on every request.
    return _plane_of(request)


Plane = Annotated[ControlPlane, Depends(_plane)]


async def _principal(request: Request) -> Principal:
    return await _plane_of(request).keys.authenticate(request.headers.get("authorization", ""))


def scope(needed: Scope) -> Any:
    async def check(principal: Annotated[Principal, Depends(_principal)]) -> Principal:
        principal.require(needed)
        return principal

    return Depends(check)


Inference = Annotated[Principal, scope("inference")]
Operator = Annotated[Principal, scope("operator")]
Admin = Annotated[Principal, scope("admin")]
PoolReader = Annotated[Principal, scope("pool")]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LabelsBody(_Body):
    labels: dict[str, str]
    replace: bool = False


class RolloutBody(_Body):
    model: Annotated[str, Field(description="name:version in the tenant's registry")]
    selector: str = ""
    waves: list[float] = [10.0, 50.0, 100.0]
    failure_threshold: float = 0.2
    health_window_s: float = 60.0
    wave_timeout_s: float = 900.0
    max_concurrent: int = 100
    max_error_rate: float = 0.05
    max_latency_ratio: float = 3.0
    allow_downgrade: bool = False
    min_samples: int = 0
    max_eval_drop: float = 0.05


class CommandBody(_Body):
    action: Literal["ping", "reload", "rollback"]
    # How long to wait for the device's reply (0: send and return at once).
    wait_s: Annotated[float, Field(ge=0, le=60)] = 10.0


class KeyBody(_Body):
    # Shown in listings, logs and the console: no control characters (a newline forges a line).
    name: Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f\x7f]+$")]
    scope: Scope
    # None: the key never expires.
    expires_in_s: Annotated[float, Field(ge=MIN_KEY_LIFETIME_S, le=MAX_KEY_LIFETIME_S)] | None = None


class ConfigBody(_Body):
    selector: str = ""
    config: dict[str, Any]


probes = APIRouter()
# The fallback gateway's routes, matched before every other route: they carry the traffic.
gateway = APIRouter(prefix="/v1")
v1 = APIRouter(prefix="/v1")
# The most devices one page of GET /v1/devices may ask for.
MAX_PAGE = 10_000


@probes.get("/healthz")
async def healthz() -> Health:
    return Health(status="ok")


@probes.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz(request: Request) -> JSONResponse:
    plane = _plane_of(request)
    if request.app.state.plane_task.done():
        why = exit_reason(request.app.state.plane_task)
        return JSONResponse({"ready": False, "reason": f"the control loop stopped: {why}"}, status_code=503)
    offline = [t for t, link in plane.links.items() if not link.connected.is_set()]
    return JSONResponse({"ready": True, "replica": plane.settings.replica_id, "broker_offline": offline})


@probes.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus"}},
)
async def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    registry = getattr(request.app.state, "metrics_registry", None)
    if registry is None:
        from cloud.plane.metrics import plane_registry

        counts = getattr(request.app.state, "request_counts", None)
        registry = request.app.state.metrics_registry = plane_registry(_plane_of(request), counts)
    body = await asyncio.to_thread(generate_latest, registry)  # the fleet counts read the database
    return Response(body, media_type=CONTENT_TYPE_LATEST)


# -- devices ---------------------------------------------------------------------------------------
@v1.get("/devices")
async def list_devices(
    plane: Plane,
    who: Operator,
    selector: Annotated[str, Query()] = "",
    after: Annotated[str, Query(max_length=64)] = "",
    limit: Annotated[int | None, Query(ge=1, le=MAX_PAGE)] = None,
) -> DeviceList:
    """The devices ``selector`` matches, by id; with ``limit``, a page of at most that many after
    the id ``after``, and ``next_after`` the id to ask the next page after (null on the last)."""
    found = await asyncio.to_thread(
        plane.fleet.list_devices,
        who.tenant,
        Selector.parse(selector),
        after=after,
        limit=None if limit is None else limit + 1,
    )
    more = limit is not None and len(found) > limit
    return DeviceList.model_validate(
        {
            "devices": [d.public() for d in found[:limit]],
            "next_after": found[limit - 1].device_id if more and limit is not None else None,
        }
    )


@v1.get("/devices/{device_id}")
async def show_device(device_id: str, plane: Plane, who: Operator) -> DeviceView:
    device = await asyncio.to_thread(plane.fleet.get, who.tenant, device_id)
    return DeviceView.model_validate(device.public())


@v1.put("/devices/{device_id}/labels")
async def set_labels(device_id: str, body: LabelsBody, plane: Plane, who: Operator) -> DeviceView:
    device = await asyncio.to_thread(
        plane.fleet.set_labels, who.tenant, device_id, body.labels, replace=body.replace
    )
    return DeviceView.model_validate(device.public())


# -- models ----------------------------------------------------------------------------------------
@v1.get("/models", response_model_exclude_unset=True)
async def list_models(plane: Plane, who: Inference) -> Catalogue:
    """One catalogue, two readers: ``data`` is the OpenAI model list of what the gateway serves
    (what the ``openai`` client reads); ``models``, for operator keys, the tenant's registry."""
    served = await plane.gateway.models()
    out: dict[str, Any] = served.model_dump(mode="json")
    if who.allows("operator"):
        out["models"] = await asyncio.to_thread(_registry_views, plane.registry(who.tenant))
    return Catalogue.model_validate(out)


def _registry_views(registry: ModelRegistry) -> list[dict[str, Any]]:
    return [model_view(e, registry.pool_digest(e.name, e.version)) for e in registry.list()]


@v1.get("/models/{name}/{version}")
async def show_model(name: str, version: str, plane: Plane, who: Operator) -> ModelDetail:
    registry = plane.registry(who.tenant)
    entry = await asyncio.to_thread(registry.get, name, version)
    view = model_view(entry, await asyncio.to_thread(registry.pool_digest, name, version))
    view["manifest"] = entry.manifest.model_dump(mode="json", by_alias=True)
    return ModelDetail.model_validate(view)


@v1.get(
    "/models/{name}/{version}/pool",
    response_model=None,
    responses={200: {"model": SignedPoolArtifact, "description": "The signed pool artifact"}},
)
async def pool_artifact(name: str, version: str, plane: Plane, who: PoolReader) -> Response:
    """The signed pool artifact of a version (shared/pool_artifact.py), byte for byte as signed:
    what a pool replica verifies against the keys it trusts before fetching the files."""
    entry = await asyncio.to_thread(plane.registry(who.tenant).pool, name, version)
    return Response(entry.raw, media_type="application/json", headers={POOL_DIGEST_HEADER: entry.digest})


@v1.get(
    "/models/{name}/{version}/pool/files/{path:path}",
    response_class=FileResponse,
    responses={
        200: {
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            "description": "The file's bytes",
        }
    },
)
async def pool_file(name: str, version: str, path: str, plane: Plane, who: PoolReader) -> FileResponse:
    """One file of a version's pool artifact (Range requests resume a large one)."""
    stored = await asyncio.to_thread(plane.registry(who.tenant).pool_file, name, version, path)
    return FileResponse(stored, media_type="application/octet-stream")


@v1.delete("/models/{name}/{version}")
async def delete_model(name: str, version: str, plane: Plane, who: Admin) -> ModelDeleted:
    freed = await asyncio.to_thread(plane.delete_model, who.tenant, name, version)
    return ModelDeleted(deleted=f"{name}:{version}", bytes_freed=freed)


# -- rollouts --------------------------------------------------------------------------------------
@v1.post("/rollouts", status_code=201)
async def create_rollout(body: RolloutBody, plane: Plane, who: Operator) -> RolloutView:
    fields = body.model_dump(exclude={"model", "waves"})
    created = await asyncio.to_thread(plane.create_rollout, who.tenant, body.model, body.waves, **fields)
    return RolloutView.model_validate(created)


@v1.get("/rollouts")
async def list_rollouts(plane: Plane, who: Operator, devices: bool = True) -> RolloutList:
    """Every rollout, oldest first, with (unless ``?devices=false``) every device's state."""
    return RolloutList.model_validate(
        {"rollouts": await asyncio.to_thread(plane.rollouts.list, who.tenant, devices)}
    )


@v1.get("/rollouts/{rollout_id}")
async def show_rollout(rollout_id: str, plane: Plane, who: Operator, devices: bool = True) -> RolloutView:
    """The rollout with its waves' counts and (unless ``?devices=false``) every device's state."""
    return RolloutView.model_validate(
        await asyncio.to_thread(plane.rollouts.show, who.tenant, rollout_id, devices)
    )


Action = Literal["pause", "resume", "abort", "rollback"]


@v1.post("/rollouts/{rollout_id}/{action}")
async def rollout_action(rollout_id: str, action: Action, plane: Plane, who: Operator) -> RolloutView:
    fn = getattr(plane.rollouts, action)
    return RolloutView.model_validate(await asyncio.to_thread(fn, who.tenant, rollout_id))


# -- API keys (admin) ------------------------------------------------------------------------------
@v1.get("/keys")
async def list_keys(plane: Plane, who: Admin) -> KeyList:
    """The tenant's keys (never their secrets): scope, creation, expiry, revoked."""
    return KeyList.model_validate({"keys": await asyncio.to_thread(plane.keys.list, who.tenant)})


@v1.post("/keys", status_code=201)
async def create_key(body: KeyBody, plane: Plane, who: Admin) -> KeyCreated:
    """A new key of the caller's tenant; the full key is in this answer only."""
    key_id, key = await asyncio.to_thread(
        plane.keys.create, who.tenant, body.name, body.scope, expires_in_s=body.expires_in_s
    )
    listed = next(k for k in await asyncio.to_thread(plane.keys.list, who.tenant) if k["key_id"] == key_id)
    return KeyCreated.model_validate({**listed, "key": key})


@v1.delete("/keys/{key_id}")
async def revoke_key(key_id: str, plane: Plane, who: Admin) -> KeyRevoked:
    if not await asyncio.to_thread(plane.keys.revoke, who.tenant, key_id):
        raise NotFound("no such key", key_id=key_id)
    return KeyRevoked(key_id=key_id, revoked=True)


# -- commands --------------------------------------------------------------------------------------
@v1.post(
    "/devices/{device_id}/commands",
    response_model=CommandSent,
    responses={202: {"model": CommandSent, "description": "sent; no reply in time"}},
)
async def send_command(device_id: str, body: CommandBody, plane: Plane, who: Operator) -> JSONResponse:
    """A signed one-shot command; 200 with the device's reply, or 202 when none came in time (an
    offline device gets it on reconnect while the command has not expired)."""
    await asyncio.to_thread(plane.fleet.get, who.tenant, device_id)  # 404 for an unknown device
    command, reply = await plane.command(who.tenant, device_id, body.action, body.wait_s)
    sent = CommandSent(
        request_id=command.request_id, action=command.action, counter=command.counter, status="sent"
    )
    if reply is None:
        return JSONResponse(sent.model_dump(exclude_none=True), status_code=202)
    answered = sent.model_copy(update={"status": "answered", "ok": reply.ok, "detail": reply.detail})
    return JSONResponse(answered.model_dump())


# -- config ----------------------------------------------------------------------------------------
@v1.post("/config")
async def push_config(body: ConfigBody, plane: Plane, who: Operator) -> ConfigPushed:
    pushed = await plane.push_config(who.tenant, body.selector, body.config)
    return ConfigPushed(devices=pushed, config=body.config)


# -- the fallback gateway (DESIGN.md §6) ------------------------------------------------------------
_STREAM = {"text/event-stream": {"schema": {"type": "string"}, "example": "data: {...}\n\ndata: [DONE]\n\n"}}


@gateway.post(
    "/completions",
    response_model=None,
    responses={200: {"model": CompletionResponse, "content": _STREAM}, 503: {"model": ErrorEnvelope}},
)
async def gateway_completions(
    body: CompletionRequest, request: Request, plane: Plane, who: Inference
) -> Response:
    plane.rate_limiter.check(who.tenant)
    return await plane.gateway.forward(
        "/completions", body.model_dump(exclude_unset=True), closest=_closest(request)
    )


@gateway.post(
    "/chat/completions",
    response_model=None,
    responses={200: {"model": ChatCompletionResponse, "content": _STREAM}, 503: {"model": ErrorEnvelope}},
)
async def gateway_chat(
    body: ChatCompletionRequest, request: Request, plane: Plane, who: Inference
) -> Response:
    plane.rate_limiter.check(who.tenant)
    return await plane.gateway.forward(
        "/chat/completions", body.model_dump(exclude_unset=True), closest=_closest(request)
    )


def _closest(request: Request) -> bool:
    return wants_closest_version(request.headers.get(VERSION_FALLBACK_HEADER, ""))


@v1.get("/gateway")
async def gateway_state(plane: Plane, who: Operator) -> GatewayState:
    return GatewayState.model_validate(
        {
            "replicas": [r.view() for r in plane.gateway.replicas],
            "retries": plane.gateway.retries,
            "timeouts": plane.gateway.timeouts,
            "upstream_errors": plane.gateway.upstream_errors,
            "stream_breaks": plane.gateway.stream_breaks,
            "version_substitutions": plane.gateway.substitutions,
            "rate_limited": plane.rate_limiter.refused,
        }
    )


def install(app: FastAPI) -> None:
    install_error_handlers(app)

    @app.exception_handler(DataError)
    async def _unstorable(_: Request, exc: DataError) -> JSONResponse:
        # A value the database cannot hold or compare, from the request (PostgreSQL refuses a
        # NUL in text: "%00" in an id was a 500): the client's to fix. Ids and keys are checked
        # before they reach a query; this covers what is stored as it came.
        reason = str(getattr(exc, "orig", exc)).splitlines()[0]
        return error_response(400, f"the request holds a value the database cannot store: {reason}")

    app.include_router(gateway)
    app.include_router(probes)
    app.include_router(v1)
