"""The logic behind the local OpenAI-compatible endpoints (the router stays thin)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from edge_agent.model_host import LoadedModel, ModelHost
from edge_agent.runtime.generator import GenerationParams, GenerationResult
from edge_agent.runtime.sampling import SamplingConfig
from edge_agent.settings import RuntimeSettings
from shared.errors import InferenceError
from shared.openai_api import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    Usage,
    new_id,
)

SERVED_BY_HEADER = "X-AutoGLM-Served-By"


class CompletionService:
    def __init__(self, host: ModelHost, runtime: RuntimeSettings) -> None:
        self.host = host
        self.runtime = runtime

    def models(self) -> ModelList:
        current = self.host.current
        return ModelList(data=[ModelCard(id=current.model_id)] if current else [])

    def _check_model(self, requested: str, loaded: LoadedModel) -> None:
        # Clients may name the model by "name", "name:version", or leave the choice to us with "default".
        names = {loaded.model_id, loaded.manifest.name, "default"}
        if requested not in names:
            raise InferenceError(
                f"model {requested!r} is not served here; this device serves {loaded.model_id!r}",
                param="model",
                status=404,
                code="model_not_found",
            )

    def params(self, req: CompletionRequest) -> GenerationParams:
        return GenerationParams(
            max_tokens=req.max_tokens or self.runtime.default_max_tokens,
            sampling=SamplingConfig(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k),
            stop=tuple(req.stop_list()),
            seed=req.seed,
        )

    def _prompt(self, req: CompletionRequest) -> str:
        try:
            return req.prompt_text()
        except ValueError as exc:
            raise InferenceError(str(exc), param="prompt") from exc

    async def complete(self, req: CompletionRequest) -> CompletionResponse:
        if self.host.current is not None:
            self._check_model(req.model, self.host.current)
        prompt = self._prompt(req)
        loaded, result = await self.host.generate(prompt, self.params(req))
        text = prompt + result.text if req.echo else result.text
        return CompletionResponse(
            model=loaded.model_id,
            choices=[CompletionChoice(text=text, finish_reason=result.finish_reason)],
            usage=_usage(result),
        )

    async def complete_stream(self, req: CompletionRequest) -> AsyncIterator[str]:
        if self.host.current is not None:
            self._check_model(req.model, self.host.current)
        loaded, items = await self.host.stream(self._prompt(req), self.params(req))
        return _sse(loaded, items)


def _usage(result: GenerationResult) -> Usage:
    return Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        total_tokens=result.prompt_tokens + result.completion_tokens,
    )


async def _sse(loaded: LoadedModel, items: AsyncIterator[str | GenerationResult]) -> AsyncIterator[str]:
    cid = new_id("cmpl")
    async for item in items:
        if isinstance(item, GenerationResult):
            chunk = CompletionResponse(
                id=cid,
                model=loaded.model_id,
                choices=[CompletionChoice(text="", finish_reason=item.finish_reason)],
                usage=_usage(item),
            )
        else:
            chunk = CompletionResponse(
                id=cid, model=loaded.model_id, choices=[CompletionChoice(text=item, finish_reason=None)]
            )
        yield f"data: {json.dumps(chunk.model_dump(exclude_none=True))}\n\n"
    yield "data: [DONE]\n\n"
