"""The control plane's FastAPI application: the lifespan owns the ``ControlPlane`` and its loop.

Kept apart from ``service`` (the plane) and ``api`` (the routes, which use the plane), so that
neither imports the other in a circle.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI

from cloud.plane.api import install
from cloud.plane.gateway_routes import GatewayRoutes
from cloud.plane.metrics import CountRequests
from cloud.plane.service import ControlPlane
from cloud.settings import CloudSettings
from edge_agent.serving.body_limit import BodyLimit
from shared.tasks import background

log = logging.getLogger(__name__)


def create_app(settings: CloudSettings) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        plane = ControlPlane(settings)
        app.state.plane = plane
        try:
            async with background(plane.run(), log, "the control loop", "control-plane") as task:
                app.state.plane_task = task
                yield
        finally:
            await plane.gateway.aclose()
            plane.close()

    app = FastAPI(title="Open-AutoGLM control plane", version="0.1.0", lifespan=lifespan)
    install(app)
    app.state.request_counts = counts = collections.Counter[str]()
    # Starlette runs the middleware added last first: every request is counted, its body capped,
    # then the gateway's routes are answered before FastAPI's routing.
    app.add_middleware(GatewayRoutes)
    app.add_middleware(BodyLimit, max_bytes=settings.api.max_body_bytes)
    app.add_middleware(CountRequests, counts=counts)
    return app
