"""The logic behind the OpenAI-compatible endpoints (the routers stay thin).

The same service serves the edge's local model (``ModelHost``) and the cloud pool's batch engine,
through the small :class:`TextBackend` protocol, so a response has one shape wherever it was made.
Every request that reaches the backend is reported once to ``on_finished``, success or failure;
the edge writes it as a telemetry record to its outbox, so the cloud sees error rates and latency
per model even for offline periods.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from pydantic import BaseModel

from edge_agent.runtime.chat import ChatTemplate
from edge_agent.runtime.generator import GenerationParams, GenerationResult, Resume, StreamItem, Tokens
from edge_agent.runtime.logprobs import Scored, TokenLogprob
from edge_agent.runtime.sampling import SamplingConfig
from edge_agent.runtime.structured import GUIDED, grammar_for, guided_grammar
from edge_agent.runtime.text import Prompt
from edge_agent.runtime.tools import ToolPlan, plan_tools, template_messages
from edge_agent.serving.config import ServingConfig
from edge_agent.serving.errors import error_event
from shared.errors import Conflict, InvalidRequest, ModelNotFound, RequestError
from shared.openai_api import (
    DEFAULT_MODEL,
    MODEL_HEADER,
    ChatChoice,
    ChatChoiceMessage,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    FinishReason,
    FunctionCallDelta,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    SamplingParams,
    TokenLogprobEntry,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    Usage,
    new_id,
)

SERVED_BY_HEADER = "X-AutoGLM-Served-By"
# Headers of an upstream answer worth relaying (the rest describe the hop, not the answer).
_RELAYED_HEADERS = ("content-type", "retry-after", MODEL_HEADER.lower())

log = logging.getLogger(__name__)


def cloud_answer_headers(upstream: Mapping[str, str]) -> dict[str, str]:
    """The headers for relaying a cloud answer: its content type and Retry-After, served by cloud."""
    headers = {k: v for k in _RELAYED_HEADERS if (v := upstream.get(k)) is not None}
    headers[SERVED_BY_HEADER] = "cloud"
    return headers


def chunk_served_by(
    where: str | None, finish_reasons: Iterable[object] = (), usage: object = None
) -> str | None:
    """The ``served_by`` of a chunk of a stream that ``where`` finished (another server began it):
    ``where`` on its last chunks (a finish reason, the usage), None on the others."""
    return where if usage or any(finish_reasons) else None


class ServedModel(Protocol):
    @property
    def model_id(self) -> str: ...

    @property
    def names(self) -> frozenset[str]:
        """Every name a client may ask for this model by."""
        ...

    @property
    def chat(self) -> ChatTemplate: ...

    @property
    def digest(self) -> str:
        """The signed manifest's digest ('' where the model does not come from a package)."""
        ...


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
    ) -> tuple[ServedModel, AsyncIterator[StreamItem]]: ...


@dataclass(frozen=True)
class Finished:
    """One request the backend took, as ``on_finished`` hears of it."""

    model: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    error: str | None  # None: answered; else the error code ("client_disconnected", …)


@dataclass(frozen=True)
class Continuation:
    """A chat stream another server began and broke off: the rest is generated here and sent
    as more chunks of that stream (its id, model name and creation time)."""

    chunk_id: str
    model: str
    created: int
    resume: Resume
    # What the last chunks say made the answer, e.g. "cloud→local".
    served_by: str


# Where a local chat stream that filled the local context goes on: given the answer so far and the
# tokens it took, the chunks of a server with a longer context, or None (it ends as it is).
Overflow = Callable[[str, int], Awaitable[AsyncIterator[dict[str, Any]] | None]]


@dataclass
class _Prepared:
    prompt: Prompt
    params: GenerationParams
    started: float
    tools: ToolPlan | None = None


class CompletionService:
    def __init__(
        self,
        host: TextBackend,
        serving: Callable[[], ServingConfig],
        on_finished: Callable[[Finished], None] | None = None,
        installed: Callable[[], list[str]] | None = None,
    ) -> None:
        self.host = host
        self.serving = serving
        self.on_finished = on_finished
        # "name:version@digest" of every model on this device (both slots), for a refused pin.
        self.installed = installed

    def models(self) -> ModelList:
        current = self.host.current
        return ModelList(
            data=[ModelCard(id=current.model_id, digest=current.digest or None)] if current else []
        )

    # -- request preparation -----------------------------------------------------------------
    def _model_for(self, requested: str) -> ServedModel:
        loaded = self.host.require()
        name, pinned, digest = requested.partition("@")
        if pinned:
            # "name@sha256:…" asks for exactly these bytes: served only if they are what runs here.
            if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
                raise InvalidRequest("a pinned model is name@sha256:<64 hex digits>", param="model")
            if digest != loaded.digest or (name != DEFAULT_MODEL and name not in loaded.names):
                here = self.installed() if self.installed is not None else []
                here = here or [f"{loaded.model_id}@{loaded.digest or 'unknown'}"]
                raise Conflict(
                    f"model {requested!r} is not what this server serves; installed: {', '.join(here)} "
                    f"(serving {loaded.model_id})",
                    param="model",
                )
            return loaded
        # Clients may name the model by "name", "name:version", or leave the choice to us with "default".
        if requested != DEFAULT_MODEL and requested not in loaded.names:
            raise ModelNotFound(
                f"model {requested!r} is not served here; this server serves {loaded.model_id!r}",
                param="model",
            )
        return loaded

    def params(
        self,
        req: SamplingParams,
        extra_stop: tuple[str, ...] = (),
        *,
        logprobs: int | None = None,
        tools: ToolPlan | None = None,
    ) -> GenerationParams:
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
        extra = req.model_extra or {}
        options = extra.get("stream_options")
        if options is not None and (not req.stream or not isinstance(options, dict)):
            # As OpenAI answers: accepted silently, it would promise a usage chunk never sent.
            why = "an object" if req.stream else "only allowed when stream is true"
            raise InvalidRequest(f"stream_options is {why}", param="stream_options")
        grammars = {
            "response_format": grammar_for(extra.get("response_format")),
            next((n for n in GUIDED if extra.get(n) is not None), "guided"): guided_grammar(extra),
            "tool_choice": tools.grammar() if tools is not None else None,
        }
        holding = [name for name, grammar in grammars.items() if grammar is not None]
        if len(holding) > 1:
            raise InvalidRequest(
                f"{' and '.join(holding)} would both constrain the output; send one", param=holding[0]
            )
        return GenerationParams(
            grammar=grammars[holding[0]] if holding else None,
            # A tool call's grammar is its functions' parameters: their errors name the tools.
            grammar_param=("tools" if holding[0] == "tool_choice" else holding[0])
            if holding
            else "response_format",
            logprobs=logprobs,
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
            token_ids=req.wants_token_ids(),
        )

    def _prepare_completion(self, req: CompletionRequest) -> _Prepared:
        started = time.perf_counter()
        self._model_for(req.model)
        try:
            prompt = req.prompt_text()
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="prompt") from exc
        if req.echo and req.logprobs is not None:
            raise InvalidRequest("logprobs of an echoed prompt are not supported; drop echo", param="echo")
        return _Prepared(Prompt(prompt), self.params(req, logprobs=req.logprobs), started)

    def _prepare_chat(self, req: ChatCompletionRequest) -> _Prepared:
        started = time.perf_counter()
        loaded = self._model_for(req.model)
        try:
            logprobs = req.logprobs_wanted()
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="top_logprobs") from exc
        tools = plan_tools(req, loaded.chat)
        try:
            messages = template_messages(req.messages, loaded.chat, tools)
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="messages") from exc
        offered = tools.tools if tools is not None and tools.native else None
        params = self.params(req, loaded.chat.stop, logprobs=logprobs, tools=tools)
        continue_final = bool(req.continue_final_message)
        if continue_final:
            if req.add_generation_prompt:
                raise InvalidRequest(
                    "continue_final_message and add_generation_prompt cannot both be true",
                    param="add_generation_prompt",
                )
            if req.messages[-1].role != "assistant":
                raise InvalidRequest(
                    "continue_final_message needs the last message to be the assistant's", param="messages"
                )
        prompt = loaded.chat.prompt(
            messages,
            offered,
            add_generation_prompt=req.add_generation_prompt is not False,
            continue_final=continue_final,
        )
        return _Prepared(prompt, params, started, tools)

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
        render: Callable[[ServedModel, AsyncIterator[StreamItem]], AsyncIterator[BaseModel | str]],
    ) -> AsyncIterator[str]:
        """Server-sent events: the chunks ``render`` makes of the generation's items, then [DONE]."""
        loaded, items = await self.host.stream(prep.prompt, prep.params)

        async def events() -> AsyncIterator[str]:
            results: list[GenerationResult] = []

            async def tap() -> AsyncIterator[StreamItem]:
                try:
                    async for item in items:
                        if isinstance(item, GenerationResult):
                            results.append(item)
                        yield item
                finally:
                    # A client gone mid-stream closes this chain; the generation must hear of it now.
                    aclose = getattr(items, "aclose", None)
                    if aclose is not None:
                        await aclose()

            chunks = render(loaded, tap())
            try:
                async for chunk in chunks:
                    # A str is an event already made (another server's chunk, relayed).
                    yield (
                        chunk
                        if isinstance(chunk, str)
                        else f"data: {chunk.model_dump_json(exclude_none=True)}\n\n"
                    )
                yield "data: [DONE]\n\n"
            except _BrokeOff:
                pass  # it ended with the error event: no [DONE], the answer is incomplete
            except Exception as exc:
                # The 200 and perhaps some tokens went out already: the client gets the error as
                # the stream's last event (a connection that just ended read as a network fault).
                if not isinstance(exc, RequestError):
                    log.exception("a stream failed after it began")
                yield error_event(exc)
            finally:
                await _aclose(chunks)
                result = results[0] if results else None
                self._record(prep, loaded.model_id, result, None if result else "stream_interrupted")

        return events()

    # -- endpoints -------------------------------------------------------------------------------
    async def complete(self, req: CompletionRequest) -> CompletionResponse:
        prep = self._prepare_completion(req)
        loaded, result = await self._generate(prep)
        text = prep.prompt.text + result.text if req.echo else result.text
        logprobs = _completion_logprobs(result.logprobs) if result.logprobs is not None else None
        return CompletionResponse(
            model=loaded.model_id,
            choices=[CompletionChoice(text=text, logprobs=logprobs, finish_reason=result.finish_reason)],
            usage=_usage(result),
        )

    async def complete_stream(self, req: CompletionRequest) -> AsyncIterator[str]:
        cid = new_id("cmpl")
        wants_usage = req.wants_usage()
        prep = self._prepare_completion(req)
        echoed = prep.prompt.text if req.echo else ""

        async def render(loaded: ServedModel, items: AsyncIterator[StreamItem]) -> AsyncIterator[BaseModel]:
            def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> CompletionResponse:
                answer = CompletionResponse(id=cid, model=loaded.model_id, choices=choices, usage=usage)
                return answer.usage_null(wants_usage)

            if echoed:  # the prompt first, as the whole answer starts with it (logprobs refuse echo)
                yield chunk([CompletionChoice(text=echoed, finish_reason=None)])
            scored: list[TokenLogprob] = []
            offsets = _TextOffsets()
            async for item in items:
                if isinstance(item, Scored):
                    scored.extend(item.tokens)
                elif isinstance(item, Tokens):
                    pass  # token ids are sent in chat chunks only
                elif isinstance(item, GenerationResult):
                    yield chunk([CompletionChoice(text="", finish_reason=item.finish_reason)])
                    if wants_usage:
                        yield chunk([], _usage(item))
                else:
                    logprobs = _completion_logprobs(scored, offsets) if req.logprobs is not None else None
                    scored = []
                    yield chunk([CompletionChoice(text=item, logprobs=logprobs, finish_reason=None)])

        return await self._stream(prep, render)

    async def chat(self, req: ChatCompletionRequest) -> ChatCompletionResponse:
        prep = self._prepare_chat(req)
        loaded, result = await self._generate(prep)
        content: str | None = result.text
        calls: list[ToolCall] = []
        if prep.tools is not None:
            content, calls = prep.tools.split(result.text)
        finish: FinishReason = "tool_calls" if calls else result.finish_reason
        logprobs = _chat_logprobs(result.logprobs) if result.logprobs is not None else None
        message = ChatChoiceMessage(content=content, tool_calls=calls or None)
        ids = result.token_ids if prep.params.token_ids else None
        return ChatCompletionResponse(
            model=loaded.model_id,
            choices=[ChatChoice(message=message, logprobs=logprobs, finish_reason=finish, token_ids=ids)],
            usage=_usage(result),
        )

    async def chat_stream(
        self,
        req: ChatCompletionRequest,
        continued: Continuation | None = None,
        overflow: Overflow | None = None,
    ) -> AsyncIterator[str]:
        """The chat's server-sent events; with ``continued``, the rest of a stream another server
        began (no role chunk again, its id and model name, ``served_by`` on the last chunks).
        With ``overflow``, an answer the context cut short is finished by the server it gives,
        as more chunks of this stream (``served_by`` says where)."""
        cid = continued.chunk_id if continued is not None else new_id("chatcmpl")
        wants_usage = req.wants_usage()
        prep = self._prepare_chat(req)
        if continued is not None:
            if prep.tools is not None:
                raise InvalidRequest("a stream with tools cannot be continued elsewhere", param="tools")
            prep.params = replace(prep.params, resume=continued.resume)

        async def render(
            loaded: ServedModel, items: AsyncIterator[StreamItem]
        ) -> AsyncIterator[BaseModel | str]:
            first = continued is None
            label = continued.model if continued is not None else loaded.model_id
            served_by = continued.served_by if continued is not None else None
            created = continued.created if continued is not None else int(time.time())

            def chunk(
                delta: ChatDelta,
                finish: FinishReason | None = None,
                logprobs: ChoiceLogprobs | None = None,
                ids: list[int] | None = None,
            ) -> ChatCompletionChunk:
                nonlocal first
                if first:
                    delta.role, first = "assistant", False
                choice = ChatChunkChoice(delta=delta, logprobs=logprobs, finish_reason=finish, token_ids=ids)
                return ChatCompletionChunk(
                    id=cid,
                    model=label,
                    created=created,
                    choices=[choice],
                    served_by=chunk_served_by(served_by, [finish]),
                ).usage_null(wants_usage)

            calls = prep.tools.stream() if prep.tools is not None else None
            scored: list[TokenLogprob] = []
            ids: list[int] = []

            def carrying(delta: ChatDelta) -> ChatCompletionChunk:
                """``delta`` with the logprobs and ids of the tokens held since the last one."""
                nonlocal scored, ids
                logprobs = _chat_logprobs(scored) if prep.params.logprobs is not None else None
                sent = ids if prep.params.token_ids else None
                scored, ids = [], []
                return chunk(delta, logprobs=logprobs, ids=sent)

            def content(text: str) -> ChatCompletionChunk:
                return carrying(ChatDelta(content=text))

            async for item in items:
                if isinstance(item, Scored):
                    scored.extend(item.tokens)
                elif isinstance(item, Tokens):
                    ids.extend(item.ids)
                elif isinstance(item, GenerationResult):
                    finish: FinishReason = item.finish_reason
                    more = None
                    # Not under a grammar: the other server would start it again mid-document.
                    if (
                        overflow is not None
                        and item.context_full
                        and calls is None
                        and prep.params.grammar is None
                    ):
                        more = await overflow(item.text, item.completion_tokens)
                    if more is not None:
                        try:
                            async for relayed in more:
                                yield _relabel(relayed, cid, label, created)
                                if "error" in relayed:
                                    raise _BrokeOff
                        finally:
                            await _aclose(more)
                        return
                    if calls is not None:
                        tail, made = calls.finish()
                        if tail:
                            yield content(tail)
                        for index, call in enumerate(made):
                            function = FunctionCallDelta(
                                name=call.function.name, arguments=call.function.arguments
                            )
                            delta = ToolCallDelta(index=index, id=call.id, type="function", function=function)
                            # The calls' own tokens were held with their text: their logprobs
                            # (and ids) go with the first call, as a whole answer carries them.
                            calling = ChatDelta(tool_calls=[delta])
                            yield carrying(calling) if index == 0 else chunk(calling)
                        if made:
                            finish = "tool_calls"
                    yield chunk(ChatDelta(), finish)
                    if wants_usage:
                        usage = _usage(item)
                        yield ChatCompletionChunk(
                            id=cid,
                            model=label,
                            created=created,
                            choices=[],
                            usage=usage,
                            served_by=chunk_served_by(served_by, usage=usage),
                        )
                else:
                    text = calls.push(item) if calls is not None else item
                    if text:
                        yield content(text)

        return await self._stream(prep, render)


def _usage(result: GenerationResult) -> Usage:
    return Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        total_tokens=result.prompt_tokens + result.completion_tokens,
        prompt_tokens_details=(
            PromptTokensDetails(cached_tokens=result.cached_tokens) if result.cached_tokens else None
        ),
    )


def _token_text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def _chat_logprobs(scored: list[TokenLogprob]) -> ChoiceLogprobs:
    return ChoiceLogprobs(
        content=[
            TokenLogprobEntry(
                token=_token_text(t.token),
                logprob=t.logprob,
                bytes=list(t.token),
                top_logprobs=[TopLogprob(token=_token_text(b), logprob=lp, bytes=list(b)) for b, lp in t.top],
            )
            for t in scored
        ]
    )


def _legacy_token(raw: bytes) -> str:
    """A token as legacy completions name it: its text, or where its bytes are not whole UTF-8
    characters, ``bytes:\\xNN…`` as OpenAI writes them (decoded with replacement, the pieces of
    one emoji were all "\ufffd": alternatives overwrote each other as keys)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


class _TextOffsets:
    """Where each token starts in the answer's text, in characters, from the tokens' bytes: a
    token inside a multi-byte character starts where that character does."""

    def __init__(self) -> None:
        self.chars = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def take(self, raw: bytes) -> int:
        at = self.chars
        self.chars += len(self._decoder.decode(raw))
        return at


def _completion_logprobs(
    scored: list[TokenLogprob], offsets: _TextOffsets | None = None
) -> CompletionLogprobs:
    offsets = offsets or _TextOffsets()
    return CompletionLogprobs(
        tokens=[_legacy_token(t.token) for t in scored],
        token_logprobs=[t.logprob for t in scored],
        # The chosen token is always among its step's alternatives, as OpenAI lists them.
        top_logprobs=[{_legacy_token(b): lp for b, lp in (*t.top, (t.token, t.logprob))} for t in scored],
        text_offset=[offsets.take(t.token) for t in scored],
    )


async def _aclose(chunks: AsyncIterator[Any]) -> None:
    aclose = getattr(chunks, "aclose", None)
    if aclose is not None:
        await aclose()


class _BrokeOff(Exception):
    """A relayed stream ended with an error event: the stream ends there, without [DONE]."""


def _relabel(chunk: dict[str, Any], cid: str, model: str, created: int) -> str:
    """Another server's chunk as one of this stream's: this stream's id, model name and creation
    time, no second ``role``, and where it was made on its last chunks."""
    if "error" not in chunk:
        chunk = {**chunk, "id": cid, "model": model, "created": created}
        for choice in chunk.get("choices") or ():
            if isinstance(choice, dict) and isinstance(choice.get("delta"), dict):
                choice["delta"].pop("role", None)
    return "data: " + json.dumps(chunk, ensure_ascii=False) + "\n\n"
