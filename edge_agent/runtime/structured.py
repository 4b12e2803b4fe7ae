"""Structured output that cannot fail to parse: ``response_format`` ``json_object`` and
``json_schema`` enforced while decoding, with llguidance (the grammar engine vLLM, llama.cpp
and ONNX Runtime GenAI use; it works on a ``tokenizers`` tokenizer and numpy, no torch).

Each step, the matcher says which tokens keep the output a prefix of a valid document; every
other logit is set to -inf before the sampler chooses, and the chosen token is fed back. The
document is complete when the matcher stops; the model's end-of-turn tokens are allowed only
where the document may end. JSON is compact (no free whitespace), so sampling at any temperature
keeps making progress instead of emitting blanks.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from llguidance import LLMatcher, LLTokenizer
from tokenizers import Tokenizer

from shared.errors import InvalidRequest

# Compact JSON: a model sampling at temperature 1 cannot wander into endless whitespace.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False}
# json_object: any JSON object (OpenAI's "JSON mode").
_ANY_OBJECT: dict[str, Any] = {"type": "object"}


def grammar_for(response_format: Any) -> str | None:
    """The llguidance grammar for an OpenAI ``response_format`` (None for plain text);
    InvalidRequest naming ``response_format`` for anything else or a schema it cannot compile."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict) or not isinstance(response_format.get("type"), str):
        raise InvalidRequest("response_format is an object with a type", param="response_format")
    kind = response_format["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        schema: Any = _ANY_OBJECT
    elif kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise InvalidRequest(
                "response_format.json_schema is an object with a schema", param="response_format"
            )
        schema = spec.get("schema") or _ANY_OBJECT
    else:
        raise InvalidRequest(
            f"response_format type {kind!r} is not one of text, json_object, json_schema",
            param="response_format",
        )
    return _schema_grammar(schema, "response_format")


# vLLM's extensions, in the request body beside OpenAI's parameters.
GUIDED = ("guided_json", "guided_regex", "guided_choice")


def guided_grammar(extra: dict[str, Any]) -> str | None:
    """The grammar for vLLM's ``guided_json`` (a schema), ``guided_regex`` or ``guided_choice``
    (a list of strings, the answer is exactly one); None when the request has none of them."""
    given = [name for name in GUIDED if extra.get(name) is not None]
    if not given:
        return None
    if len(given) > 1:
        raise InvalidRequest(f"send one of {', '.join(given)}", param=given[1])
    name = given[0]
    value = extra[name]
    if name == "guided_json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise InvalidRequest(f"guided_json is not JSON: {exc}", param=name) from exc
        if not isinstance(value, dict):
            raise InvalidRequest("guided_json is a JSON schema (an object)", param=name)
        return _schema_grammar(value, name)
    if name == "guided_choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise InvalidRequest("guided_choice is a list of non-empty strings", param=name)
        lark = "start: " + " | ".join(json.dumps(c) for c in value)
        return compiled(LLMatcher.grammar_from_lark, lark, name)
    if not isinstance(value, str) or not value:
        raise InvalidRequest("guided_regex is a regular expression (a string)", param=name)
    return compiled(LLMatcher.grammar_from_regex, value, name)


def _schema_grammar(schema: dict[str, Any], param: str) -> str:
    source = json.dumps(schema)
    return compiled(
        lambda text: LLMatcher.grammar_from_json_schema(text, overrides=JSON_OPTIONS),  # type: ignore[arg-type]
        source,
        param,
        f"{param} schema",
    )


def compiled(build: Callable[[str], str], source: str, param: str, label: str | None = None) -> str:
    """``build(source)`` checked by llguidance; InvalidRequest naming ``param`` (the message begins
    with ``label``, the param by default) when it does not compile or validate."""
    label = label or param
    try:
        grammar = build(source)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise InvalidRequest(f"{label}: {brief(str(exc))}", param=param) from exc
    failed, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        raise InvalidRequest(f"{label}: {brief(messages[0])}", param=param)
    return grammar


class GrammarTokenizers:
    """The llguidance view of a model's tokenizer: built once per model (about a second), shared
    by its requests."""

    def __init__(self, tokenizer: Tokenizer, eos_ids: Iterable[int]) -> None:
        self._tokenizer = tokenizer
        self._eos = sorted(eos_ids)
        self._built: LLTokenizer | None = None
        self._lock = threading.Lock()

    def get(self) -> LLTokenizer:
        with self._lock:
            if self._built is None:
                self._built = LLTokenizer(
                    byte_level_view(self._tokenizer.to_str()),
                    n_vocab=self._tokenizer.get_vocab_size(with_added_tokens=True),
                    eos_token=self._eos or None,
                )
            return self._built

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for (a special token: its text)."""
        raw: bytes = self.get().decode_bytes([token])
        if raw.startswith(b"\xff"):  # llguidance marks special tokens with a 0xFF prefix
            return (self._tokenizer.id_to_token(token) or "").encode()
        return raw


def byte_level_view(tokenizer_json: str) -> str:
    """The tokenizer as llguidance must read it to see the bytes behind each token.

    llguidance recognises a byte-level BPE vocabulary by its ``ByteLevel`` decoder. Tokenizers
    imported from GGUF wrap that decoder in a ``Sequence`` (ByteFallback, Fuse, Replace,
    ByteLevel); llguidance then takes ``Ġ`` and ``Ċ`` for the letters they are drawn with instead
    of the space and newline they stand for, and a grammar would let a raw newline into a JSON
    string or never match a literal ``"\\n"``. Decoding is all that changes here."""
    spec = json.loads(tokenizer_json)
    decoder = spec.get("decoder") or {}
    if decoder.get("type") == "Sequence":
        level = [d for d in decoder.get("decoders", []) if d.get("type") == "ByteLevel"]
        if level:
            spec["decoder"] = level[0]
            return json.dumps(spec)
    return tokenizer_json


def brief(message: str, limit: int = 300) -> str:
    """llguidance's message without the parser state and grammar text it may append."""
    first = message.split("<state>", 1)[0].strip().splitlines()
    text = first[0].strip() if first else "the grammar failed"
    return text if len(text) <= limit else text[: limit - 1] + "…"


class Constrained:
    """One request's grammar state over the decode loop; its errors name ``param``, the request
    field the grammar came from."""

    def __init__(self, tokenizer: LLTokenizer, grammar: str, param: str = "response_format") -> None:
        self.param = param
        self.matcher = LLMatcher(tokenizer, grammar)
        if self.matcher.is_error():
            raise InvalidRequest(f"{param}: {brief(self.matcher.get_error())}", param=param)
        # Some grammars validate and fail only when a mask is asked of them over a real vocabulary
        # (a schema that is nothing but a reference to itself, {"$ref": "#"}): asked here, that is
        # a 400. Found at the first step instead, only EOS stayed allowed, and an empty answer
        # came back as a complete one (finish_reason "stop").
        self._first: bytes | None = self.matcher.compute_bitmask()
        if self.matcher.is_error():
            raise InvalidRequest(f"{param}: {brief(self.matcher.get_error())}", param=param)

    def _failed(self) -> InvalidRequest:
        # Mid-answer, a grammar fails on its own limits (a self-referential schema that grows
        # past the parser's item limit): the request's doing, never a silent end nor a 500.
        return InvalidRequest(
            f"{self.param}: the grammar could not go on mid-answer: {brief(self.matcher.get_error())}",
            param=self.param,
        )

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """A copy of ``logits`` [vocab] where only tokens the grammar allows keep their value;
        InvalidRequest when the grammar fails mid-answer (never a silent end)."""
        raw, self._first = self._first or self.matcher.compute_bitmask(), None
        if self.matcher.is_error():
            raise self._failed()
        bits = np.frombuffer(raw, dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[: logits.shape[0]].astype(bool)
        out = np.full(logits.shape, -np.inf, dtype=np.float64)
        n = allowed.shape[0]
        out[:n][allowed] = logits[:n][allowed]
        return out

    def accept(self, token: int) -> None:
        self._first = None  # the state moved on: the mask computed at the start no longer holds
        if not self.matcher.consume_token(token):
            raise self._failed()

    @property
    def complete(self) -> bool:
        """The document is whole and nothing more may follow."""
        return bool(self.matcher.is_stopped())

    @property
    def may_end(self) -> bool:
        return bool(self.matcher.is_accepting())
