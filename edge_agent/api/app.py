"""The local API application; its lifespan owns the agent and its background tasks."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import Depends, FastAPI, Request

from edge_agent.agent import EdgeAgent
from edge_agent.api.router import probes, require_api_key, v1
from edge_agent.batch import (
    ActivityMeter,
    BatchJournal,
    BatchService,
    BatchWorker,
    IdleSignal,
    InteractiveActivity,
    ItemExecutor,
    batch_routes,
)
from edge_agent.metrics import EdgeMetrics, RequestMetrics
from edge_agent.routing.breaker import CircuitBreaker
from edge_agent.routing.cloud import CloudFallback
from edge_agent.routing.router import RequestRouter
from edge_agent.serving.body_limit import BodyLimit
from edge_agent.serving.errors import install_error_handlers
from edge_agent.serving.openai_routes import Responder, ServedByHeader, ServiceResponder, openai_routes
from edge_agent.serving.service import CompletionService, Finished
from edge_agent.settings import EdgeSettings
from shared.tasks import background

log = logging.getLogger(__name__)


def create_app(settings: EdgeSettings) -> FastAPI:
    meter = ActivityMeter()  # interactive requests in flight: batch work waits for them

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        agent = EdgeAgent(settings)
        try:
            app.state.agent = agent
            fb = settings.fallback
            cloud = CloudFallback(
                lambda: agent.serving,
                api_key=fb.api_key,
                allowed_urls=agent.allowed_cloud_urls,
                connect_timeout_s=fb.connect_timeout_s,
                breaker=CircuitBreaker(fb.breaker_failures, fb.breaker_reset_s),
            )

            def record_local(f: Finished) -> None:
                agent.telemetry.record(
                    model=f.model,
                    served_by="local",
                    prompt_tokens=f.prompt_tokens,
                    completion_tokens=f.completion_tokens,
                    latency_ms=f.latency_ms,
                    error=f.error,
                )

            local = CompletionService(agent.host, lambda: agent.serving, record_local, agent.installed_models)
            app.state.router = RequestRouter(
                ServiceResponder(local, "local"), cloud, lambda: agent.serving, agent.telemetry
            )
            app.state.metrics = EdgeMetrics(agent, app.state.router)
            journal = BatchJournal(
                settings.data_dir / "batches.sqlite3", retention_s=settings.batch.retention_s
            )
            worker = BatchWorker(
                journal,
                ItemExecutor(local, app.state.router),
                policy=lambda: agent.serving.router_policy,
                local_model=lambda: agent.host.current is not None,
                idle=IdleSignal(meter, lambda: agent.host.waiting, settings.batch.idle_s),
                online=lambda: agent.link.online,
                settings=settings.batch,
            )
            app.state.batch_worker = worker
            app.state.batches = BatchService(journal, settings.batch, worker.wake)
            try:
                async with (
                    background(agent.run(), log, "the agent's background loop", "edge-agent") as task,
                    background(worker.run(), log, "the batch worker", "batch-worker"),
                ):
                    app.state.agent_task = task
                    yield
            finally:
                await cloud.aclose()
                journal.close()
        finally:
            # Also when the start failed part way: the folder is free for the next agent.
            agent.data_dir.release()

    app = FastAPI(title="Open-AutoGLM edge agent", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(ServedByHeader)
    app.add_middleware(RequestMetrics)
    app.add_middleware(InteractiveActivity, meter=meter)
    # An upload may be as large as a batch file may be, with room for the multipart framing.
    upload_cap = max(settings.api.max_body_bytes, settings.batch.max_file_bytes + 64 * 1024)
    app.add_middleware(BodyLimit, max_bytes=settings.api.max_body_bytes, per_path={"/v1/files": upload_cap})
    app.include_router(probes)
    app.include_router(v1)
    app.include_router(openai_routes(_router, prefix="/v1", dependencies=[Depends(require_api_key)]))
    app.include_router(batch_routes(_batches, prefix="/v1", dependencies=[Depends(require_api_key)]))
    return app


def _router(request: Request) -> Responder:
    router: RequestRouter = request.app.state.router
    return router


def _batches(request: Request) -> BatchService:
    service: BatchService = request.app.state.batches
    return service
