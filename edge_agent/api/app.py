"""The local API application; its lifespan owns the agent and its background tasks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from edge_agent.agent import EdgeAgent
from edge_agent.api.errors import install_error_handlers
from edge_agent.api.router import probes, v1
from edge_agent.api.serving import CompletionService
from edge_agent.metrics import EdgeMetrics, RequestMetrics
from edge_agent.settings import EdgeSettings

log = logging.getLogger(__name__)


def _log_exit(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("the agent's background loop stopped", exc_info=task.exception())


def create_app(settings: EdgeSettings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        agent = EdgeAgent(settings)
        app.state.agent = agent
        app.state.metrics = EdgeMetrics(agent)
        app.state.completions = CompletionService(agent.host, lambda: agent.serving, agent.telemetry)
        task = asyncio.create_task(agent.run(), name="edge-agent")
        task.add_done_callback(_log_exit)
        app.state.agent_task = task
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    app = FastAPI(title="Open-AutoGLM edge agent", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(RequestMetrics)
    app.include_router(probes)
    app.include_router(v1)
    return app
