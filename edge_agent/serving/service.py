"""The logic behind the OpenAI-compatible endpoints (the routers stay thin).

The same service serves the edge's local model (``ModelHost``) and the cloud pool's batch engine,
through the small :class:`TextBackend` protocol, so a response has one shape wherever it was made.
Every request that reaches the backend is reported once to ``on_finished``, success or failure;
the edge writes it as a telemetry record to its outbox, so the cloud sees error rates and latency
per model even for offline periods.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from pydantic import BaseModel

from edge_agent.runtime.chat import ChatTemplate
from edge_agent.runtime.generator import GenerationParams, GenerationResult
from edge_agent.runtime.sampling import SamplingConfig
from edge_agent.runtime.structured import grammar_for
from edge_agent.runtime.text import Prompt
from edge_agent.serving.config import ServingConfig
from shared.errors import InvalidRequest, ModelNotFound, RequestError
from shared.openai_api import (
    ChatChoice,
    ChatChoiceMessage,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    SamplingParams,
    Usage,
    new_id,
)

SERVED_BY_HEADER = "X-AutoGLM-Served-By"
# Headers of an upstream answer worth relaying (the rest describe the hop, not the answer).
_RELAYED_HEADERS = ("content-type", "retry-after")


def cloud_answer_headers(upstream: Mapping[str, str]) -> dict[str, str]:
    """The headers for relaying a cloud answer: its content type and Retry-After, served by cloud."""
    headers = {k: v for k in _RELAYED_HEADERS if (v := upstream.get(k)) is not None}
    headers[SERVED_BY_HEADER] = "cloud"
    return headers


class ServedModel(Protocol):
    @property
    def model_id(self) -> str: ...

    @property
    def names(self) -> frozenset[str]:
        """Every name a client may ask for this model by."""
        ...

    @property
    def chat(self) -> ChatTemplate: ...


class TextBackend(Protocol):
    """Where text is generated: admission (429/503) and the model's lifetime are its business."""

    @property
    def current(self) -> ServedModel | None: ...

    def require(self) -> ServedModel: ...

    async def generate(
        self, prompt: Prompt, params: GenerationParams
    ) -> tuple[ServedModel, GenerationResult]: ...

    async def stream(
        self, prompt: Prompt, params: GenerationParams
    ) -> tuple[ServedModel, AsyncIterator[str | GenerationResult]]: ...


@dataclass(frozen=True)
class Finished:
    """One request the backend took, as ``on_finished`` hears of it."""

    model: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    error: str | None  # None: answered; else the error code ("client_disconnected", …)


@dataclass
class _Prepared:
    prompt: Prompt
    params: GenerationParams
    started: float


class CompletionService:
    def __init__(
        self,
        host: TextBackend,
        serving: Callable[[], ServingConfig],
        on_finished: Callable[[Finished], None] | None = None,
    ) -> None:
        self.host = host
        self.serving = serving
        self.on_finished = on_finished

    def models(self) -> ModelList:
        current = self.host.current
        return ModelList(data=[ModelCard(id=current.model_id)] if current else [])

    # -- request preparation -----------------------------------------------------------------
    def _model_for(self, requested: str) -> ServedModel:
        loaded = self.host.require()
        # Clients may name the model by "name", "name:version", or leave the choice to us with "default".
        if requested != "default" and requested not in loaded.names:
            raise ModelNotFound(
                f"model {requested!r} is not served here; this device serves {loaded.model_id!r}",
                param="model",
            )
        return loaded

    def params(self, req: SamplingParams, extra_stop: tuple[str, ...] = ()) -> GenerationParams:
        refused = req.unsupported()
        if refused:
            raise InvalidRequest(
                f"not supported by this server: {', '.join(refused)} (refused rather than ignored)",
                param=refused[0],
            )
        try:
            limit = req.token_limit()
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="max_completion_tokens") from exc
        cfg = self.serving()
        grammar = grammar_for((req.model_extra or {}).get("response_format"))
        return GenerationParams(
            grammar=grammar,
            max_tokens=limit or cfg.default_max_tokens,
            sampling=SamplingConfig(
                temperature=cfg.temperature if req.temperature is None else req.temperature,
                top_p=cfg.top_p if req.top_p is None else req.top_p,
                top_k=cfg.top_k if req.top_k is None else req.top_k,
                presence_penalty=req.presence_penalty or 0.0,
                frequency_penalty=req.frequency_penalty or 0.0,
                logit_bias=tuple((int(k), v) for k, v in sorted((req.logit_bias or {}).items())),
            ),
            stop=tuple(req.stop_list()) + extra_stop,
            seed=req.seed,
            max_tokens_requested=limit is not None,
        )

    def _prepare_completion(self, req: CompletionRequest) -> _Prepared:
        started = time.perf_counter()
        self._model_for(req.model)
        try:
            prompt = req.prompt_text()
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="prompt") from exc
        return _Prepared(Prompt(prompt), self.params(req), started)

    def _prepare_chat(self, req: ChatCompletionRequest) -> _Prepared:
        started = time.perf_counter()
        loaded = self._model_for(req.model)
        try:
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="messages") from exc
        return _Prepared(loaded.chat.prompt(messages), self.params(req, loaded.chat.stop), started)

    # -- telemetry -----------------------------------------------------------------------------
    def _record(
        self, prep: _Prepared, model: str, result: GenerationResult | None, error: str | None
    ) -> None:
        if self.on_finished is None:
            return
        self.on_finished(
            Finished(
                model=model,
                prompt_tokens=result.prompt_tokens if result else 0,
                completion_tokens=result.completion_tokens if result else 0,
                latency_ms=(time.perf_counter() - prep.started) * 1000,
                error=error,
            )
        )

    async def _generate(self, prep: _Prepared) -> tuple[ServedModel, GenerationResult]:
        current = self.host.current
        try:
            loaded, result = await self.host.generate(prep.prompt, prep.params)
        except RequestError as exc:
            if exc.status >= 500 or exc.status == 429:
                self._record(prep, current.model_id if current else "", None, exc.code or "error")
            raise
        except asyncio.CancelledError:
            self._record(prep, current.model_id if current else "", None, "client_disconnected")
            raise
        self._record(prep, loaded.model_id, result, None)
        return loaded, result

    async def _stream(
        self,
        prep: _Prepared,
        render: Callable[[ServedModel, str | GenerationResult, bool], BaseModel],
        usage: Callable[[ServedModel, GenerationResult], BaseModel] | None,
    ) -> AsyncIterator[str]:
        """Server-sent events; with ``usage`` (stream_options.include_usage), one more chunk after
        the last, with no choices and the request's usage, as OpenAI sends it."""
        loaded, items = await self.host.stream(prep.prompt, prep.params)

        async def events() -> AsyncIterator[str]:
            first = True
            result: GenerationResult | None = None
            try:
                async for item in items:
                    if isinstance(item, GenerationResult):
                        result = item
                    yield f"data: {render(loaded, item, first).model_dump_json(exclude_none=True)}\n\n"
                    first = False
                if usage is not None and result is not None:
                    yield f"data: {usage(loaded, result).model_dump_json(exclude_none=True)}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                self._record(prep, loaded.model_id, result, None if result else "stream_interrupted")

        return events()

    # -- endpoints -------------------------------------------------------------------------------
    async def complete(self, req: CompletionRequest) -> CompletionResponse:
        prep = self._prepare_completion(req)
        loaded, result = await self._generate(prep)
        text = prep.prompt.text + result.text if req.echo else result.text
        return CompletionResponse(
            model=loaded.model_id,
            choices=[CompletionChoice(text=text, finish_reason=result.finish_reason)],
            usage=_usage(result),
        )

    async def complete_stream(self, req: CompletionRequest) -> AsyncIterator[str]:
        cid = new_id("cmpl")

        def render(loaded: ServedModel, item: str | GenerationResult, first: bool) -> BaseModel:
            if isinstance(item, GenerationResult):
                choice = CompletionChoice(text="", finish_reason=item.finish_reason)
                return CompletionResponse(id=cid, model=loaded.model_id, choices=[choice])
            choice = CompletionChoice(text=item, finish_reason=None)
            return CompletionResponse(id=cid, model=loaded.model_id, choices=[choice])

        def usage(loaded: ServedModel, result: GenerationResult) -> BaseModel:
            return CompletionResponse(id=cid, model=loaded.model_id, choices=[], usage=_usage(result))

        return await self._stream(self._prepare_completion(req), render, usage if req.wants_usage() else None)

    async def chat(self, req: ChatCompletionRequest) -> ChatCompletionResponse:
        loaded, result = await self._generate(self._prepare_chat(req))
        return ChatCompletionResponse(
            model=loaded.model_id,
            choices=[
                ChatChoice(message=ChatChoiceMessage(content=result.text), finish_reason=result.finish_reason)
            ],
            usage=_usage(result),
        )

    async def chat_stream(self, req: ChatCompletionRequest) -> AsyncIterator[str]:
        cid = new_id("chatcmpl")

        def render(loaded: ServedModel, item: str | GenerationResult, first: bool) -> BaseModel:
            if isinstance(item, GenerationResult):
                choice = ChatChunkChoice(delta=ChatDelta(), finish_reason=item.finish_reason)
                return ChatCompletionChunk(id=cid, model=loaded.model_id, choices=[choice])
            delta = ChatDelta(role="assistant" if first else None, content=item)
            return ChatCompletionChunk(id=cid, model=loaded.model_id, choices=[ChatChunkChoice(delta=delta)])

        def usage(loaded: ServedModel, result: GenerationResult) -> BaseModel:
            return ChatCompletionChunk(id=cid, model=loaded.model_id, choices=[], usage=_usage(result))

        return await self._stream(self._prepare_chat(req), render, usage if req.wants_usage() else None)


def _usage(result: GenerationResult) -> Usage:
    return Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        total_tokens=result.prompt_tokens + result.completion_tokens,
    )
