"""Probes and agent routes of the local API; the OpenAI routes are in openai_routes.py."""

from __future__ import annotations

import dataclasses
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from edge_agent.agent import EdgeAgent
from edge_agent.serving.auth import check_bearer


def _agent(request: Request) -> EdgeAgent:
    agent: EdgeAgent = request.app.state.agent
    return agent


async def require_api_key(request: Request) -> None:
    # async: a sync dependency would cost every request a hop to FastAPI's thread pool.
    check_bearer(request, _agent(request).settings.api.api_key)


probes = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


@probes.get("/healthz", response_model=None)
async def healthz(request: Request) -> dict[str, str] | JSONResponse:
    """Liveness: the process answers, and on an agent its background loop (MQTT link, outbox,
    reconciler) still runs; a stopped loop never recovers by itself, so the probe fails and the
    kubelet restarts the agent."""
    task = getattr(request.app.state, "agent_task", None)
    if task is not None and task.done():
        return JSONResponse({"status": "the agent's background loop stopped"}, status_code=503)
    return {"status": "ok"}


@probes.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    task = request.app.state.agent_task
    if task.done():
        return JSONResponse(
            {"ready": False, "reason": "the agent's background loop stopped"}, status_code=503
        )
    current = _agent(request).host.current
    if current is None:
        return JSONResponse({"ready": False, "reason": "no active model"}, status_code=503)
    return JSONResponse({"ready": True, "model": current.model_id})


@probes.get("/metrics")
async def metrics(request: Request) -> Response:
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


@v1.get("/agent")
async def agent_state(request: Request) -> dict[str, Any]:
    agent = _agent(request)
    reported = agent.reported_state().model_dump(mode="json", by_alias=True)
    current = agent.host.current
    return {
        "device_id": agent.settings.device_id,
        "online": agent.link.online,
        "serving": current.model_id if current else None,
        "reported": reported,
        "fetch": {
            "chunks_received": agent.fetcher.stats.chunks_received,
            "chunks_rejected": agent.fetcher.stats.chunks_rejected,
            "duplicates": agent.fetcher.stats.duplicates,
            "bytes_received": agent.fetcher.stats.bytes_received,
            # Delta updates: bytes copied from the models already on the device, not downloaded.
            "bytes_reused": agent.fetcher.stats.bytes_reused,
            "strays": agent.fetcher.stats.strays,
        },
        "dropped_messages": agent.link.dropped_messages,
        # Control messages refused: unsigned, untrusted key, altered, for another device, expired,
        # replayed (the last one's reason is in reported.control_error).
        "control_rejections": agent.control_rejections,
        "outbox": {
            "depth": agent.outbox.depth(),
            "in_flight": agent.outbox.in_flight(),
            "delivered": agent.outbox.delivered,
            "resent": agent.outbox.resent,
            "lost": agent.telemetry.lost,
            "dropped": agent.outbox.dropped,
        },
        "queue": {
            "waiting": agent.host.waiting,
            "capacity": agent.host.queue_size,
            "generating": agent.host.generating,
            "parallel": agent.host.width,
        },
        # Batch API requests not finished yet, by state, and where the finished ones were served.
        "batch": request.app.state.batch_worker.stats(),
        "config": dataclasses.asdict(agent.serving),
    }
