"""Where a request is served: the local model or the cloud, by the pushed policy (DESIGN.md §5).

==============  =================================================================================
policy          behaviour
==============  =================================================================================
local_first     local; the cloud when the local side cannot take it (no active model, queue full,
                prompt longer than the local context, a model only the cloud has, a local error)
local_only      local, never the cloud
cloud_first     the cloud; local when the cloud is unavailable (unreachable, failing, breaker open)
cloud_only      the cloud, never local
==============  =================================================================================

When neither side can serve, the message says why each could not. The status is 503 when the
model is not here at all (no active model, or one only the cloud has), the local one otherwise
(429 for a full queue, 400 for a prompt too long). With no ``cloud_url`` configured the local
answer is returned as it is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Response

from edge_agent.routing.cloud import CloudFallback
from edge_agent.serving.config import ServingConfig
from edge_agent.serving.openai_routes import ServiceResponder
from edge_agent.uplink.telemetry import TelemetryRecorder
from shared.edge_config import RouterPolicy
from shared.errors import (
    CloudUnavailable,
    ContextTooLong,
    ModelNotFound,
    ModelNotReady,
    QueueFull,
    RequestError,
)
from shared.openai_api import ChatCompletionRequest, CompletionRequest, ModelList, SamplingParams

log = logging.getLogger(__name__)

# Local refusals the cloud may be able to serve instead (and any local 5xx).
FALLBACK_ERRORS = (ModelNotReady, ModelNotFound, QueueFull, ContextTooLong)
# Local refusals that mean "this model is not here at all": only the cloud could have served it.
_NOT_HERE = (ModelNotReady, ModelNotFound)


def falls_back(exc: RequestError) -> bool:
    return isinstance(exc, FALLBACK_ERRORS) or exc.status >= 500


class RequestRouter:
    """The edge's :class:`~edge_agent.serving.openai_routes.Responder`: local model or cloud gateway."""

    def __init__(
        self,
        local: ServiceResponder,
        cloud: CloudFallback,
        serving: Callable[[], ServingConfig],
        telemetry: TelemetryRecorder,
    ) -> None:
        self.local = local
        self.cloud = cloud
        self.serving = serving
        self.telemetry = telemetry
        self.fallbacks = 0

    def models(self) -> ModelList:
        return self.local.models()

    async def completions(self, body: CompletionRequest) -> Response:
        return await self._route(body, "/completions", self.local.completions)

    async def chat(self, body: ChatCompletionRequest) -> Response:
        return await self._route(body, "/chat/completions", self.local.chat)

    async def _route(self, body: Any, path: str, local: Callable[[Any], Awaitable[Response]]) -> Response:
        policy = self.serving().router_policy
        if policy is RouterPolicy.CLOUD_ONLY:
            return await self.via_cloud(body, path)
        if policy is RouterPolicy.CLOUD_FIRST:
            try:
                return await self.via_cloud(body, path)
            except CloudUnavailable as exc:
                log.info("cloud_first: serving locally, %s", exc.message)
                return await local(body)
        try:
            return await local(body)
        except RequestError as exc:
            no_cloud = self.serving().cloud_url is None
            if policy is RouterPolicy.LOCAL_ONLY or no_cloud or not falls_back(exc):
                raise
            local_error = exc
        try:
            response = await self.via_cloud(body, path)
        except CloudUnavailable as cloud_error:
            # Both reasons in one answer, of the kind that matters to the client: the cloud's
            # when the model is not here at all, else the local refusal (429, 400, ...).
            kind = CloudUnavailable if isinstance(local_error, _NOT_HERE) else type(local_error)
            raise kind(
                f"{local_error.message}; {cloud_error.message}",
                param=local_error.param,
                retry_after_s=local_error.retry_after_s or cloud_error.retry_after_s,
            ) from cloud_error
        self.fallbacks += 1
        log.info("served by the cloud: local side said %s", local_error.code or local_error.status)
        return response

    async def via_cloud(self, body: SamplingParams, path: str) -> Response:
        """The cloud's answer to ``body`` (a non-2xx one included), recorded as telemetry;
        CloudUnavailable when there is none. Also how batch requests reach the cloud."""
        started = time.perf_counter()
        model = str(getattr(body, "model", ""))
        try:
            response, parsed = await self.cloud.forward(path, body.model_dump(exclude_unset=True))
        except CloudUnavailable:
            self._record(model, started, None, "cloud_unavailable")
            raise
        error = None if response.status_code < 400 else f"cloud_http_{response.status_code}"
        self._record(model, started, parsed, error)
        return response

    def _record(self, model: str, started: float, parsed: dict[str, Any] | None, error: str | None) -> None:
        usage = (parsed or {}).get("usage") or {}
        self.telemetry.record(
            model=str((parsed or {}).get("model") or model),
            served_by="cloud",
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            latency_ms=(time.perf_counter() - started) * 1000,
            error=error,
        )
