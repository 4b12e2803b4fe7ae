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
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import Response

from edge_agent.routing.cloud import CloudFallback
from edge_agent.routing.resume import CLOUD_TO_LOCAL, LOCAL_TO_CLOUD, Transcript
from edge_agent.serving.config import ServingConfig
from edge_agent.serving.openai_routes import ServiceResponder
from edge_agent.serving.service import Continuation, Overflow, chunk_served_by
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
from shared.openai_api import (
    DEFAULT_MODEL,
    MODEL_HEADER,
    VERSION_FALLBACK_HEADER,
    ChatCompletionRequest,
    CompletionRequest,
    ModelList,
    SamplingParams,
    new_id,
)

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
        # Local chat streams that filled the local context and were finished by the cloud.
        self.overflows = 0

    def models(self) -> ModelList:
        return self.local.models()

    async def completions(self, body: CompletionRequest) -> Response:
        return await self._route(body, "/completions", self.local.completions)

    async def chat(self, body: ChatCompletionRequest) -> Response:
        overflow = self._overflow(body) if body.stream and not body.tools else None
        return await self._route(body, "/chat/completions", lambda b: self.local.chat(b, overflow))

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
        CloudUnavailable when there is none. Also how batch requests reach the cloud.

        A chat stream that breaks mid-answer is finished by the local model unless the policy is
        cloud_only (routing/resume.py): the cloud is asked for its chunks' token ids for that."""
        started = time.perf_counter()
        model = str(getattr(body, "model", ""))
        payload = body.model_dump(exclude_unset=True)
        resumable = (
            body
            if isinstance(body, ChatCompletionRequest)
            and body.stream
            and not body.tools
            and self.serving().router_policy is not RouterPolicy.CLOUD_ONLY
            and self._runs_here(model)
            else None
        )
        strip = False
        if resumable is not None:
            strip = not resumable.wants_token_ids()
            payload["return_token_ids"] = True
        headers = self._same_version(payload)
        try:
            response, parsed = await self.cloud.forward(
                path,
                payload,
                take_over=self._take_over(resumable) if resumable is not None else None,
                strip_token_ids=strip,
                headers=headers,
            )
        except CloudUnavailable:
            self._record(model, started, None, "cloud_unavailable")
            raise
        error = None if response.status_code < 400 else f"cloud_http_{response.status_code}"
        self._record(response.headers.get(MODEL_HEADER) or model, started, parsed, error)
        return response

    def _runs_here(self, model: str) -> bool:
        """Whether the local model could continue an answer asked of ``model``: only then is the
        cloud asked for token ids (a request for another model goes as the app sent it, and an
        upstream that refuses unknown fields still answers it)."""
        current = self.local.serving()
        if current is None:
            return False
        name, pinned, digest = model.partition("@")
        if pinned and digest != current.digest:
            return False  # another build of the model: the local one would refuse it (409)
        return name == DEFAULT_MODEL or name == current.model_id or name in current.names

    def _same_version(self, payload: dict[str, Any]) -> dict[str, str]:
        """Ask the cloud for the version this device runs. A request for the local model by its
        name or as "default" names it "name:version" and lets the gateway answer with the
        closest version it has when it lacks this one (``X-AutoGLM-Model`` of the answer then
        names it); one that asked for the version, or pinned this digest, gets that version or
        nothing. A request for another model goes as it is."""
        current = self.local.serving()
        model = payload.get("model")
        if current is None or not isinstance(model, str):
            return {}
        name, pinned, digest = model.partition("@")
        if pinned:
            if digest and digest == current.digest and name in (*current.names, DEFAULT_MODEL):
                payload["model"] = current.model_id
            return {}
        if model == current.model_id:
            return {}
        if model != DEFAULT_MODEL and model not in current.names:
            return {}
        payload["model"] = current.model_id
        return {VERSION_FALLBACK_HEADER: "closest"}

    def _overflow(self, body: ChatCompletionRequest) -> Overflow:
        """A local chat stream that filled the local context goes on in the cloud (whose model
        may hold more): the answer so far as the assistant's message to continue."""

        async def to_cloud(text: str, generated: int) -> AsyncIterator[dict[str, Any]] | None:
            cfg = self.serving()
            if cfg.router_policy is RouterPolicy.LOCAL_ONLY or cfg.cloud_url is None:
                return None
            limit = body.token_limit()
            if limit is not None and limit <= generated:
                return None
            payload = body.model_dump(exclude_unset=True)
            payload["messages"] = [*payload["messages"], {"role": "assistant", "content": text}]
            payload.update(stream=True, continue_final_message=True, add_generation_prompt=False)
            payload.pop("max_completion_tokens", None)
            if limit is not None:
                payload["max_tokens"] = limit - generated
            try:
                chunks = await self.cloud.open_stream(
                    "/chat/completions", payload, self._same_version(payload)
                )
            except CloudUnavailable as exc:
                log.warning(
                    "a local answer that filled the context cannot go on in the cloud: %s", exc.message
                )
                return None
            self.overflows += 1
            log.info("a local answer filled the local context after %d tokens; the cloud goes on", generated)
            return _served_by(chunks, LOCAL_TO_CLOUD)

        return to_cloud

    def _take_over(
        self, body: ChatCompletionRequest
    ) -> Callable[[Transcript], Awaitable[AsyncIterator[str] | None]]:
        async def take_over(transcript: Transcript) -> AsyncIterator[str] | None:
            if self.serving().router_policy is RouterPolicy.CLOUD_ONLY:
                return None  # pushed while the stream ran
            continued = Continuation(
                chunk_id=transcript.chunk_id or new_id("chatcmpl"),
                model=transcript.model or body.model,
                created=transcript.created or int(time.time()),
                resume=transcript.resume(),
                served_by=CLOUD_TO_LOCAL,
            )
            try:
                return await self.local.service.chat_stream(body, continued)
            except RequestError as exc:
                log.warning("a broken cloud stream cannot be continued locally: %s", exc.message)
                return None
            except Exception:
                # Bytes went out already: the client must get the honest error event, not a cut.
                log.exception("a broken cloud stream could not be continued locally")
                return None

        return take_over

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


async def _served_by(chunks: AsyncIterator[dict[str, Any]], where: str) -> AsyncIterator[dict[str, Any]]:
    """The chunks, the last ones (a finish reason, the usage) saying where the answer was made."""
    async for chunk in chunks:
        choices = chunk.get("choices")
        reasons = (
            [c.get("finish_reason") for c in choices if isinstance(c, dict)]
            if isinstance(choices, list)
            else []
        )
        if (said := chunk_served_by(where, reasons, chunk.get("usage"))) is not None:
            chunk = {**chunk, "served_by": said}
        yield chunk
