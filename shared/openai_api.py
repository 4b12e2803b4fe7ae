"""OpenAI-compatible request/response schemas, shared by the edge API and the cloud fallback.

Requests tolerate unknown fields (clients send many we ignore); responses are ours and exact.
The fields we do read are typed strictly, as OpenAI's API is: ``"10"`` or ``true`` is not a
number of tokens, and a negative seed is refused with 400 rather than failing later with 500.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
)


class _Tolerant(BaseModel):
    model_config = ConfigDict(extra="allow")


def _encodable(value: Any) -> Any:
    """Text must be valid Unicode: JSON lets a lone surrogate (``"\\ud800"``) through, which no
    tokenizer can encode. Strings, and the strings in lists and mappings (a tool's JSON schema),
    keys included."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError(f"text is not valid Unicode (lone surrogate at index {exc.start})") from exc
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
    return value


# Parameters of OpenAI's API that change what is generated and that this server does not
# implement yet: a request that asks for one gets 400 naming it, not an answer without it.
_NOT_IMPLEMENTED = frozenset(
    {
        "functions",
        "function_call",
        "suffix",
        "best_of",
        "prediction",
        "modalities",
        "audio",
        "guided_grammar",
    }
)


# OpenAI's limits: up to 20 alternatives per token in chat, 5 in (legacy) completions; we allow
# 20 in both, as vLLM does.
MAX_TOP_LOGPROBS = 20
# The model a client names to leave the choice to the server: the edge's loaded model, or a pool
# replica's own.
DEFAULT_MODEL = "default"
# The model id ("name:version") a cloud answer was made by: the gateway says it, the edge relays it.
MODEL_HEADER = "X-AutoGLM-Model"
# Sent by an edge's fallback with the value "closest": when no pool replica serves the exact
# "name:version" asked for, the gateway answers with the nearest version of that name it has
# (and MODEL_HEADER names it) instead of 404.
VERSION_FALLBACK_HEADER = "X-AutoGLM-Version-Fallback"


def wants_closest_version(header_value: str) -> bool:
    """Whether a VERSION_FALLBACK_HEADER value asks for the nearest version."""
    return header_value.strip().lower() == "closest"


class SamplingParams(_Tolerant):
    # Floats are finite (allow_inf_nan=False): NaN fails every bound, and was refused as if it
    # were too large.
    # Beyond the model's context (prompt included) the answer is 400, not a silently shorter one.
    max_tokens: Annotated[int, Field(ge=1, le=32768, strict=True)] | None = None
    # None: the device's configured default (pushed from the cloud or set in edge.yaml).
    temperature: Annotated[float, Field(ge=0.0, le=2.0, strict=True, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0, strict=True, allow_inf_nan=False)] | None = None
    top_k: Annotated[int, Field(ge=0, strict=True)] | None = None
    seed: Annotated[int, Field(ge=0, le=2**63 - 1, strict=True)] | None = None
    stop: str | list[str] | None = None
    stream: Annotated[bool, Field(strict=True)] = False
    n: Annotated[int, Field(ge=1, le=1, strict=True)] = 1
    user: str | None = None
    # OpenAI's newer name for max_tokens (chat); both may be given only with the same value.
    max_completion_tokens: Annotated[int, Field(ge=1, le=32768, strict=True)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0, strict=True, allow_inf_nan=False)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0, strict=True, allow_inf_nan=False)] | None = (
        None
    )
    # Token id (as a string, as OpenAI sends it) → bias added to its logit, in [-100, 100].
    logit_bias: (
        dict[str, Annotated[float, Field(ge=-100.0, le=100.0, strict=True, allow_inf_nan=False)]] | None
    ) = None

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return None
        if len(value) > 300:
            raise ValueError("at most 300 token ids")
        for key in value:
            if not key.isdigit() or int(key) >= 2**31:
                raise ValueError(f"{key!r} is not a token id")
        return value

    def token_limit(self) -> int | None:
        """max_tokens or max_completion_tokens (ValueError when they disagree)."""
        if (
            self.max_tokens is not None
            and self.max_completion_tokens is not None
            and self.max_tokens != self.max_completion_tokens
        ):
            raise ValueError("max_tokens and max_completion_tokens disagree; send one")
        return self.max_tokens if self.max_tokens is not None else self.max_completion_tokens

    def wants_token_ids(self) -> bool:
        """vLLM's ``return_token_ids`` (chat): each choice (each stream chunk) also carries the
        ids of the tokens it holds, so a stream can be continued elsewhere token for token."""
        return bool(getattr(self, "return_token_ids", None))

    def wants_usage(self) -> bool:
        """stream_options.include_usage: a last chunk with the usage (and no choices)."""
        options = (self.model_extra or {}).get("stream_options")
        return bool(self.stream and isinstance(options, dict) and options.get("include_usage") is True)

    # Parameters of the other endpoint (chat's tools on completions, say): refused by name too.
    _FOREIGN: ClassVar[frozenset[str]] = frozenset()

    def unsupported(self) -> list[str]:
        """OpenAI parameters this server does not implement, as sent: refused, never ignored."""
        extra = self.model_extra or {}
        out = []
        for name in sorted((_NOT_IMPLEMENTED | self._FOREIGN) & extra.keys()):
            value = extra[name]
            if value is None or value is False or value == []:
                continue  # explicitly not asked for
            if name == "best_of" and value == 1:
                continue
            out.append(name)
        return out

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        bounded: str | list[str] | None = _encodable(value)
        return bounded

    def stop_list(self) -> list[str]:
        """The stop sequences less empty ones, in either form (an empty one would match at once)."""
        if self.stop is None:
            return []
        return [s for s in ([self.stop] if isinstance(self.stop, str) else self.stop) if s]


class CompletionRequest(SamplingParams):
    model: str
    prompt: str | list[str]
    echo: Annotated[bool, Field(strict=True)] = False
    # The logprob of each generated token and of this many alternatives (0: the chosen token only).
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS, strict=True)] | None = None

    # return_token_ids is implemented for chat only: refused here rather than ignored.
    _FOREIGN = frozenset(
        {"tools", "tool_choice", "parallel_tool_calls", "top_logprobs", "messages", "return_token_ids"}
    )

    _valid_prompt = field_validator("prompt")(_encodable)

    def prompt_text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise ValueError("exactly one prompt per request is supported")
            return self.prompt[0]
        return self.prompt


class ContentPart(_Tolerant):
    type: str
    text: str | None = None

    _valid_text = field_validator("text")(_encodable)


# A function name as OpenAI allows it.
FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class FunctionCall(BaseModel):
    name: str
    # JSON text, as OpenAI sends and expects it.
    arguments: str

    # Read into the chat prompt: a lone surrogate there was a 500 (the tokenizer's TypeError).
    _valid_arguments = field_validator("arguments")(_encodable)


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionSpec(_Tolerant):
    name: FunctionName
    description: str | None = None
    # A JSON schema for the arguments (an object); none: any object.
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    _valid_text = field_validator("description", "parameters")(_encodable)

    @field_validator("parameters")
    @classmethod
    def _object_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        # Arguments are an object (OpenAI's rule too): a call written with others is never
        # returned as a call, so a required one would silently come back as text.
        if value is not None and value.get("type", "object") != "object":
            raise ValueError(
                f"a function's parameters must be a schema of type object, not {value.get('type')!r}"
            )
        return value


class Tool(_Tolerant):
    type: Literal["function"]
    function: FunctionSpec


class ToolChoiceFunction(BaseModel):
    name: FunctionName


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: ToolChoiceFunction


class ChatMessage(_Tolerant):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = ""
    # An assistant's earlier calls, and on a tool message the call it answers.
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    _valid_content = field_validator("content")(_encodable)

    def text(self) -> str:
        """The message's text; image or audio parts cannot be served by a text model."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        texts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"content part of type {part.type!r} is not supported; only text")
            texts.append(part.text)
        return "".join(texts)


class ChatCompletionRequest(SamplingParams):
    model: str
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    # null is "not given", as OpenAI takes it (clients send explicit nulls).
    parallel_tool_calls: Annotated[bool, Field(strict=True)] | None = None
    logprobs: Annotated[bool, Field(strict=True)] | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS, strict=True)] | None = None
    # vLLM's extensions: continue the final (assistant) message instead of starting a new turn
    # (how a stream one server began is finished by another), and whether to open a turn at all.
    continue_final_message: Annotated[bool, Field(strict=True)] | None = None
    add_generation_prompt: Annotated[bool, Field(strict=True)] | None = None
    return_token_ids: Annotated[bool, Field(strict=True)] | None = None

    def logprobs_wanted(self) -> int | None:
        """How many alternatives per token (None: no logprobs); ValueError for top_logprobs alone."""
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return (self.top_logprobs or 0) if self.logprobs else None


class PromptTokensDetails(BaseModel):
    # Prompt tokens not computed again: their KV came from the prefix cache.
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


FinishReason = Literal["stop", "length", "tool_calls"]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class CompletionLogprobs(BaseModel):
    """Legacy completions' logprobs: parallel lists, one entry per generated token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class _NullsKept(BaseModel):
    """Fields written as null when they are None, even where None is otherwise left out (stream
    chunks are written with ``exclude_none``): OpenAI sends ``finish_reason: null`` on every chunk
    before the last, and strictly typed clients expect the key."""

    _KEEP: ClassVar[tuple[str, ...]] = ()

    def _kept(self) -> tuple[str, ...]:
        return self._KEEP

    @model_serializer(mode="wrap")
    def _keep_nulls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        out: dict[str, Any] = handler(self)
        for name in self._kept():
            out.setdefault(name, None)
        return out


class CompletionChoice(_NullsKept):
    _KEEP = ("logprobs", "finish_reason")
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobEntry]
    refusal: None = None


class _UsageOnEveryChunk(_NullsKept):
    """A stream chunk: with ``stream_options.include_usage``, every chunk carries ``usage``, null
    but on the last (OpenAI's format); ``usage_null`` says so. Subclasses declare ``usage``."""

    _usage_null: bool = PrivateAttr(False)

    def usage_null(self, keep: bool = True) -> Self:
        self._usage_null = keep
        return self

    def _kept(self) -> tuple[str, ...]:
        return ("usage",) if self._usage_null else ()


class CompletionResponse(_UsageOnEveryChunk):
    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatChoiceMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None
    # The generated ids, when the request asked for return_token_ids (as vLLM does).
    token_ids: list[int] | None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(_NullsKept):
    _KEEP = ("logprobs", "finish_reason")
    index: int = 0
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None
    # The ids behind this chunk's text, when the request asked for return_token_ids.
    token_ids: list[int] | None = None


class ChatCompletionChunk(_UsageOnEveryChunk):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    # Where the answer was made, on the last chunks of a stream that one server began and another
    # finished ("cloud→local"): the X-AutoGLM-Served-By header went out before the switch.
    served_by: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "autoglm"
    # The signed manifest's digest of the package served (an extension): a request may pin it as
    # ``model: "name@<digest>"``.
    digest: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorEnvelope(BaseModel):
    """The one error shape of every HTTP API of this project (OpenAI's)."""

    error: ErrorBody

    @classmethod
    def of(
        cls, message: str, type_: str, param: str | None = None, code: str | None = None
    ) -> dict[str, Any]:
        # A message may quote what the client sent: a lone surrogate in it would make the
        # response unencodable as UTF-8 (a 500 from the error handler itself, and a dropped
        # connection), so such characters are written as their escapes.
        return cls(
            error=ErrorBody(
                message=_encodable_text(message),
                type=type_,
                param=None if param is None else _encodable_text(param),
                code=code,
            )
        ).model_dump()


def _encodable_text(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text
