"""Structured output (edge_agent/runtime/structured.py): whatever the logits say, the grammar
lets through only a valid document. Random logits at temperature 1 stand in for the worst model;
a byte-level BPE tokenizer trained here stands in for a real one (tests/test_real_model.py runs
SmolLM2 through the API)."""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from edge_agent.runtime.sampling import SamplingConfig, choose_token
from edge_agent.runtime.structured import Constrained, GrammarTokenizers, grammar_for, guided_grammar
from shared.errors import InvalidRequest

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "kind": {"enum": ["rain", "sun", "snow"]},
        "temps": {"type": "array", "items": {"type": "integer"}, "maxItems": 3},
        "where": {
            "type": "object",
            "properties": {"lat": {"type": "number"}, "ok": {"type": "boolean"}},
            "required": ["lat", "ok"],
            "additionalProperties": False,
        },
    },
    "required": ["city", "kind", "temps", "where"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=400,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<eos>"],
    )
    tok.train_from_iterator(['{"city": "Oslo", "kind": "rain", "temps": [1, 2], "lat": 59.9}'] * 20, trainer)
    return tok


def _sample(tokenizer: Tokenizer, grammar: str, seed: int, budget: int = 300) -> str:
    eos = tokenizer.token_to_id("<eos>")
    constrained = Constrained(GrammarTokenizers(tokenizer, [eos]).get(), grammar)
    rng = np.random.default_rng(seed)
    ids: list[int] = []
    for _ in range(budget):
        logits = rng.normal(0, 3, tokenizer.get_vocab_size()).astype(np.float32)
        token = choose_token(constrained.mask(logits), SamplingConfig(temperature=1.0), rng)
        if token == eos:
            break
        constrained.accept(token)
        ids.append(token)
        if constrained.complete:
            break
    return tokenizer.decode(ids)


def test_random_logits_still_give_documents_valid_against_the_schema(tokenizer: Tokenizer) -> None:
    grammar = grammar_for({"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA}})
    assert grammar is not None
    for seed in range(20):
        text = _sample(tokenizer, grammar, seed)
        jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_mode_gives_an_object(tokenizer: Tokenizer) -> None:
    grammar = grammar_for({"type": "json_object"})
    assert grammar is not None
    for seed in range(5):
        assert isinstance(json.loads(_sample(tokenizer, grammar, seed, budget=2000)), dict)


@pytest.mark.parametrize(
    "response_format",
    [
        "json",
        {"type": "bogus"},
        {"type": "json_schema", "json_schema": {"schema": "not an object"}},
        {"type": "json_schema", "json_schema": {"schema": {"type": "object", "minProperties": "x"}}},
    ],
)
def test_a_response_format_it_cannot_honour_is_a_400(response_format: object) -> None:
    with pytest.raises(InvalidRequest) as refused:
        grammar_for(response_format)
    assert refused.value.param == "response_format"


def test_text_means_no_grammar() -> None:
    assert grammar_for(None) is None and grammar_for({"type": "text"}) is None


def _gguf_style(tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer as a GGUF import writes it: the ByteLevel decoder inside a Sequence."""
    spec = json.loads(tokenizer.to_str())
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        ],
    }
    return Tokenizer.from_str(json.dumps(spec))


def test_a_gguf_style_tokenizer_is_read_as_bytes(tokenizer: Tokenizer) -> None:
    """Without the byte-level view llguidance takes "Ġ" and "Ċ" for letters: a raw newline could
    land inside a JSON string, and a grammar's "\\n" could never match."""
    gguf = _gguf_style(tokenizer)
    grammars = GrammarTokenizers(gguf, [gguf.token_to_id("<eos>")])
    space = gguf.encode(" Oslo").ids[0]
    assert grammars.token_bytes(space).startswith(b" ")
    schema = {
        "type": "object",
        "properties": {"note": {"type": "string", "maxLength": 12}},
        "required": ["note"],
        "additionalProperties": False,
    }
    grammar = grammar_for({"type": "json_schema", "json_schema": {"schema": schema}})
    assert grammar is not None
    for seed in range(10):
        json.loads(_sample(gguf, grammar, seed))


def test_a_forced_tool_call_is_a_valid_call_whatever_the_logits(tokenizer: Tokenizer) -> None:
    from edge_agent.runtime.tools import CallFormat, ToolPlan

    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
                "required": ["city", "unit"],
                "additionalProperties": False,
            },
        },
    }
    other = {"type": "function", "function": {"name": "get_time"}}
    names = frozenset({"get_weather", "get_time"})
    for fmt in CallFormat:
        plan = ToolPlan([weather, other], "get_weather", False, fmt, False)
        grammar = plan.grammar()
        assert grammar is not None
        for seed in range(10):
            content, calls = plan.split(_sample(tokenizer, grammar, seed))
            assert content is None and [c.function.name for c in calls] == ["get_weather"], (fmt, seed)
            jsonschema.validate(json.loads(calls[0].function.arguments), weather["function"]["parameters"])
    required = ToolPlan([weather, other], "required", True, CallFormat.HERMES, False)
    grammar = required.grammar()
    assert grammar is not None
    for seed in range(10):
        _, calls = required.split(_sample(tokenizer, grammar, seed, budget=2000))
        assert calls and {c.function.name for c in calls} <= names


def test_vllm_guided_extensions_hold_the_output(tokenizer: Tokenizer) -> None:
    choice = guided_grammar({"guided_choice": ["rain", "sun", "snow"]})
    regex = guided_grammar({"guided_regex": "[0-9]{2}-[a-z]{3}"})
    schema = guided_grammar({"guided_json": json.dumps(SCHEMA)})
    assert choice and regex and schema
    for seed in range(10):
        assert _sample(tokenizer, choice, seed) in {"rain", "sun", "snow"}
        assert re.fullmatch("[0-9]{2}-[a-z]{3}", _sample(tokenizer, regex, seed))
        jsonschema.validate(json.loads(_sample(tokenizer, schema, seed)), SCHEMA)
    assert guided_grammar({"guided_json": None}) is None


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_choice": ["a", 1]}, "guided_choice"),
        ({"guided_regex": "([a-z"}, "guided_regex"),
        ({"guided_json": "{not json"}, "guided_json"),
        ({"guided_json": [1]}, "guided_json"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ],
)
def test_a_bad_guided_extension_is_a_400_naming_it(extra: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        guided_grammar(extra)
    assert refused.value.param == param


def test_a_grammar_that_fails_only_over_a_vocabulary_is_a_400_not_an_empty_stop(tokenizer: Tokenizer) -> None:
    """{"$ref": "#"} compiles and validates, then fails at the first mask: it was answered with
    an empty text and finish_reason "stop", as if it were a whole document."""
    grammar = grammar_for({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#"}}})
    assert grammar is not None
    eos = tokenizer.token_to_id("<eos>")
    with pytest.raises(InvalidRequest) as refused:
        Constrained(GrammarTokenizers(tokenizer, [eos]).get(), grammar)
    assert refused.value.param == "response_format"


def test_a_tools_defs_and_refs_resolve_against_its_own_parameters(tokenizer: Tokenizer) -> None:
    """pydantic (and openai.pydantic_function_tool) write "$defs" with "#/$defs/..." refs; nested
    under one schema holding every function, they pointed nowhere: a 400 for a valid tool."""
    from edge_agent.runtime.tools import CallFormat, ToolPlan

    ship = {
        "type": "function",
        "function": {
            "name": "ship",
            "parameters": {
                "$defs": {
                    "Addr": {
                        "type": "object",
                        "properties": {"city": {"type": "string", "maxLength": 6}},
                        "required": ["city"],
                        "additionalProperties": False,
                    }
                },
                "type": "object",
                "properties": {"to": {"$ref": "#/$defs/Addr"}, "n": {"type": "integer"}},
                "required": ["to", "n"],
                "additionalProperties": False,
            },
        },
    }
    other = {
        "type": "function",
        "function": {"name": "wait", "parameters": {"$defs": {"Addr": {"type": "integer"}}}},
    }
    for choice, parallel in (("ship", False), ("required", True)):
        plan = ToolPlan([ship, other], choice, parallel, CallFormat.HERMES, False)
        grammar = plan.grammar()
        assert grammar is not None
        for seed in range(8):
            _, calls = plan.split(_sample(tokenizer, grammar, seed, budget=2000))
            assert calls, (choice, seed)
            for call in calls:
                if call.function.name == "ship":
                    jsonschema.validate(json.loads(call.function.arguments), ship["function"]["parameters"])


def test_a_function_whose_parameters_are_not_an_object_is_refused() -> None:
    """Arguments [1] were forced by the grammar, then dropped as no call: "required" gave text."""
    from pydantic import ValidationError

    from shared.openai_api import ChatCompletionRequest

    for parameters in ({"type": "array", "items": {"type": "integer"}}, {"type": "string"}):
        with pytest.raises(ValidationError, match="parameters must be a schema of type object"):
            ChatCompletionRequest.model_validate(
                {
                    "model": "m",
                    "messages": [{"role": "user", "content": "hi"}],
                    "tools": [{"type": "function", "function": {"name": "f", "parameters": parameters}}],
                }
            )


def test_grammar_errors_are_short_and_name_the_field_they_came_from(tokenizer: Tokenizer) -> None:
    eos = tokenizer.token_to_id("<eos>")
    grammar = guided_grammar({"guided_json": {"$ref": "#"}})
    assert grammar is not None
    with pytest.raises(InvalidRequest) as refused:
        Constrained(GrammarTokenizers(tokenizer, [eos]).get(), grammar, "guided_json")
    assert refused.value.param == "guided_json"
    assert str(refused.value).startswith("guided_json: ") and "<state>" not in str(refused.value)
    assert len(str(refused.value)) < 400
