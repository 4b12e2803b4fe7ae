"""One pool replica: the OpenAI-compatible API (the edge's own routes and service) over a BatchEngine.

The lifespan loads the model and owns the engine thread; ``/readyz`` is false until the engine
runs and after it dies, so a gateway or Kubernetes stops sending work to a broken replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator

from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from cloud.pool.engine import BatchEngine, PoolModel
from cloud.pool.settings import PoolSettings
from edge_agent.runtime.generator import GenerationParams, GenerationResult, StreamItem
from edge_agent.runtime.text import Prompt
from edge_agent.serving.auth import check_bearer
from edge_agent.serving.body_limit import BodyLimit
from edge_agent.serving.config import ServingConfig
from edge_agent.serving.errors import install_error_handlers
from edge_agent.serving.openai_routes import Responder, ServiceResponder, openai_routes
from edge_agent.serving.service import CompletionService
from shared.errors import EngineDown, EngineError
from shared.openai_api import ModelCard, ModelList

log = logging.getLogger(__name__)

PREFIX = "autoglm_pool"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class PoolBackend:
    """The :class:`~edge_agent.serving.service.TextBackend` of a pool replica."""

    def __init__(self, engine: BatchEngine) -> None:
        self.engine = engine

    @property
    def current(self) -> PoolModel | None:
        return self.engine.info if self.engine.alive else None

    def require(self) -> PoolModel:
        if not self.engine.alive:
            raise EngineDown("the pool's engine is not running")
        return self.engine.info

    async def generate(self, prompt: Prompt, params: GenerationParams) -> tuple[PoolModel, GenerationResult]:
        model, items = await self.stream(prompt, params)
        async for item in items:
            if isinstance(item, GenerationResult):
                return model, item
        raise EngineError("generation ended without a result")

    async def stream(
        self, prompt: Prompt, params: GenerationParams
    ) -> tuple[PoolModel, AsyncIterator[StreamItem]]:
        model = self.require()
        admitted = await asyncio.to_thread(self.engine.check_prompt, prompt, params)
        return model, self.engine.submit_admitted(admitted)


class _EngineCollector(Collector):
    def __init__(self, engine: BatchEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self.engine.stats
        yield GaugeMetricFamily(
            f"{PREFIX}_queue_depth", "Requests waiting for a place in the batch.", self.engine.waiting
        )
        yield GaugeMetricFamily(f"{PREFIX}_batch_size", "Sequences in the running batch.", s.batch_size)
        yield GaugeMetricFamily(
            f"{PREFIX}_tokens_per_second", "Tokens generated per second over the last 10 s.", s.tokens_per_s()
        )
        yield CounterMetricFamily(f"{PREFIX}_tokens", "Tokens generated.", s.tokens_generated)
        yield CounterMetricFamily(f"{PREFIX}_requests", "Requests finished.", s.requests_done)
        yield CounterMetricFamily(f"{PREFIX}_rejected_queue_full", "Requests refused with 429.", s.rejected)
        yield CounterMetricFamily(f"{PREFIX}_decode_steps", "Batched decode steps run.", s.decode_steps)


class PoolResponder(ServiceResponder):
    """Lists every id the replica answers to ("name" and "name:version"): the gateway routes a
    request by the ids a replica lists."""

    def models(self) -> ModelList:
        current = self.service.host.current
        if current is None:
            return ModelList(data=[])
        ids = [current.model_id, *sorted(current.names - {current.model_id})]
        return ModelList(data=[ModelCard(id=i, digest=current.digest or None) for i in ids])


def create_app(settings: PoolSettings) -> FastAPI:
    registry = CollectorRegistry(auto_describe=True)
    ttft = Histogram(
        f"{PREFIX}_time_to_first_token_seconds",
        "From a request's arrival to its first token (queueing included).",
        buckets=TTFT_BUCKETS,
        registry=registry,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = BatchEngine(
            settings.model_dir,
            name=settings.name,
            version=settings.version,
            digest=settings.digest,
            device=settings.device,
            max_batch=settings.max_batch,
            queue_size=settings.queue_size,
            threads=settings.threads,
            on_first_token=ttft.observe,
        )
        registry.register(_EngineCollector(engine))
        engine.start()
        log.info(
            "pool serving %s on %s (%s), batches of up to %d",
            engine.info.model_id,
            engine.device,
            str(engine.dtype).removeprefix("torch."),
            settings.max_batch,
        )
        defaults = ServingConfig(default_max_tokens=settings.default_max_tokens)
        service = CompletionService(PoolBackend(engine), lambda: defaults)
        app.state.engine = engine
        app.state.responder = PoolResponder(service, "cloud")
        try:
            yield
        finally:
            engine.close()

    async def require_api_key(request: Request) -> None:
        check_bearer(request, settings.api_key)

    def responder(request: Request) -> Responder:
        r: Responder = request.app.state.responder
        return r

    app = FastAPI(title="Open-AutoGLM pool", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.include_router(openai_routes(responder, prefix="/v1", dependencies=[Depends(require_api_key)]))

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        engine: BatchEngine = request.app.state.engine
        if not engine.alive:
            return JSONResponse({"ready": False, "reason": "the engine thread stopped"}, status_code=503)
        return JSONResponse({"ready": True, "model": engine.info.model_id, "device": engine.device})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
