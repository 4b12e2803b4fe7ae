"""Bad input to the edge's local API and the pool gets a 4xx with a clear message, never a 500,
and a huge body never reaches the tokenizer (real agent and pool processes, the demo model)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cloud.registry import ModelRegistry, RegistryEntry
from shared.mqtt import BrokerSettings
from shared.signing import SigningKey
from tests.conftest import EdgeProcess, serving_edge
from tests.services import Service, start_pool

# (request body fields, status, param): each is a case OpenAI's API refuses too.
BAD_COMPLETIONS: list[tuple[dict[str, Any], int, str | None]] = [
    ({"prompt": "a \ud800 b"}, 400, "prompt"),  # a lone surrogate no tokenizer can encode
    ({"prompt": "hi", "stop": ["\udc00"]}, 400, "stop"),
    ({"prompt": "hi", "seed": -1}, 400, "seed"),
    ({"prompt": "hi", "max_tokens": "10"}, 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": True}, 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "hi", "temperature": "0.5"}, 400, "temperature"),
    ({"prompt": "hi", "stream": "yes"}, 400, "stream"),
    # Beyond the model's context with the prompt: refused, not silently clipped.
    ({"prompt": "hi", "max_tokens": 30000}, 400, "max_tokens"),
    # What this server does not implement is refused by name, never silently ignored.
    ({"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ({"prompt": "hi", "logprobs": True}, 400, "logprobs"),
    ({"prompt": "hi", "logprobs": 2, "echo": True}, 400, "echo"),
    ({"prompt": "hi", "top_logprobs": 2}, 400, "top_logprobs"),  # chat's name for it
    ({"prompt": "hi", "suffix": "}"}, 400, "suffix"),
    ({"prompt": "hi", "response_format": {"type": "bogus"}}, 400, "response_format"),
    (
        {"prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {"schema": []}}},
        400,
        "response_format",
    ),
    ({"prompt": "hi", "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    # What it does implement is range-checked.
    ({"prompt": "hi", "presence_penalty": 99}, 400, "presence_penalty"),
    ({"prompt": "hi", "frequency_penalty": "1"}, 400, "frequency_penalty"),
    ({"prompt": "hi", "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"99999999": 1}}, 400, "logit_bias"),  # outside the vocabulary
    ({"prompt": "hi", "max_tokens": 5, "max_completion_tokens": 6}, 400, "max_completion_tokens"),
    # A usage chunk promised for a stream that is not one (OpenAI refuses it too), or asked oddly.
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"prompt": "hi", "stream": True, "stream_options": "usage"}, 400, "stream_options"),
]


_WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
_CALLED = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{"}}
BAD_CHAT: list[tuple[dict[str, Any], str]] = [
    ({"tool_choice": "required"}, "tool_choice"),  # no tools to choose from
    ({"tools": [_WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [_WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tools": [_WEATHER, _WEATHER]}, "tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools"),
    (
        {
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
            "tool_choice": "required",
        },
        "tools",
    ),
    (
        {
            "tools": [_WEATHER],
            "tool_choice": "required",
            "response_format": {"type": "json_object"},
        },
        "response_format",
    ),
    ({"functions": [{"name": "f"}]}, "functions"),  # the deprecated form: refused by name
    ({"guided_regex": "([a-z"}, "guided_regex"),
    ({"guided_choice": ["a"], "response_format": {"type": "json_object"}}, "response_format"),
    ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs: true
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": 1}, "logprobs"),
    ({"messages": [{"role": "tool", "content": "24 C"}]}, "messages"),  # answers no call
    ({"messages": [{"role": "user", "content": "hi " * 20_000}]}, "messages"),  # longer than the context
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [_CALLED]}]}, "messages"),
]


def _post(url: str, body: dict[str, Any]) -> httpx.Response:
    # json.dumps escapes a lone surrogate as \\ud800, as a client in any language may send it.
    return httpx.post(url, content=json.dumps(body), headers={"content-type": "application/json"}, timeout=30)


def _check_refusals(base: str, model: str) -> None:
    for fields, status, param in BAD_COMPLETIONS:
        r = _post(f"{base}/v1/completions", {"model": model, **fields})
        assert r.status_code == status, (fields, r.status_code, r.text)
        error = r.json()["error"]
        assert error["param"] == param and error["message"], (fields, error)
    r = httpx.post(
        f"{base}/v1/completions",
        content=b'{"model": "x", "prompt": [',
        headers={"content-type": "application/json"},
    )
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] is None and "not valid JSON" in error["message"], r.text
    # In what a chat template reads besides the messages' text: a tool's description and schema,
    # an earlier call's arguments (a lone surrogate there reached the tokenizer: a 500).
    weather = {"type": "function", "function": {"name": "get_weather", "description": "\udc00"}}
    schema = {"type": "object", "properties": {"city": {"description": "\ud83d"}}}
    called = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"a": "\udfff"}'},
    }
    for fields, param in (
        ({"tools": [weather]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}]}, "tools"),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": None, "tool_calls": [called]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "20 C"},
                ]
            },
            "messages",
        ),
    ):
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **fields}
        r = _post(f"{base}/v1/chat/completions", body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (fields, r.status_code, r.text)
    chat = {"model": model, "messages": [{"role": "user", "content": "\ud83d"}]}
    r = _post(f"{base}/v1/chat/completions", chat)
    assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"]
    for fields, param in BAD_CHAT:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **fields}
        r = _post(f"{base}/v1/chat/completions", body)
        assert r.status_code == 400, (fields, r.status_code, r.text)
        error = r.json()["error"]
        assert error["param"] == param and error["message"], (fields, error)


def _events(base: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def _completion_text(base: str, body: dict[str, Any]) -> str:
    """A completion's text, streamed (its chunks joined; it must end with [DONE]) or not."""
    if not body.get("stream"):
        r = _post(f"{base}/v1/completions", body)
        assert r.status_code == 200, (body, r.text)
        return str(r.json()["choices"][0]["text"])
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]", (body, lines[-3:])
    return "".join(c["text"] for line in lines[:-1] for c in json.loads(line[6:])["choices"])


def _check_edges_of_valid_input(base: str, model: str) -> None:
    """Valid but unusual: a temperature as small as a subnormal float (it made the
    probabilities NaN: a 500, and a stream that broke off), an empty stop sequence (it cut the
    answer after one character), echo in a stream (it was ignored)."""
    body = {"model": model, "prompt": "def main():", "max_tokens": 6, "temperature": 0}
    plain = _completion_text(base, body)
    for stream in (False, True):
        assert _completion_text(base, {**body, "stream": stream, "temperature": 1e-310}) == plain
        assert _completion_text(base, {**body, "stream": stream, "stop": ""}) == plain
        assert _completion_text(base, {**body, "stream": stream, "echo": True}) == "def main():" + plain


def _check_usage_chunk(base: str, model: str) -> None:
    """stream_options.include_usage: one last chunk with no choices and the usage; without it,
    no usage in any chunk (as OpenAI streams)."""
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True}
    plain = _events(base, body)
    assert all("usage" not in e for e in plain) and plain[-1]["choices"][0]["finish_reason"]
    # Every chunk before the last says finish_reason (null) and logprobs (null), as OpenAI's do:
    # strictly typed clients expect the keys.
    assert all(
        e["choices"][0]["finish_reason"] is None and e["choices"][0]["logprobs"] is None for e in plain[:-1]
    )
    counted = _events(base, {**body, "stream_options": {"include_usage": True}})
    last = counted[-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] >= 1, last
    assert (
        last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + last["usage"]["completion_tokens"]
    )
    # With include_usage, every other chunk carries usage: null (OpenAI's format).
    assert all("usage" in e and e["usage"] is None for e in counted[:-1]), counted[:-1]


def _check_honoured(base: str, model: str) -> None:
    """max_completion_tokens limits the answer; a +100 logit_bias forces a token whatever the
    prompt; penalties are accepted (their effect is unit-tested in tests/test_sampling.py)."""
    chat = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 3}
    r = _post(f"{base}/v1/chat/completions", chat)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3, r.text
    texts = []
    for prompt in ("def main():", "x = 1"):
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": 4,
            "temperature": 0,
            "logit_bias": {"100": 100},
        }
        r = _post(f"{base}/v1/completions", body)
        assert r.status_code == 200, r.text
        texts.append(r.json()["choices"][0]["text"])
    assert texts[0] == texts[1] and texts[0], texts
    body = {
        "model": model,
        "prompt": "a",
        "max_tokens": 8,
        "presence_penalty": 1.5,
        "frequency_penalty": -0.5,
    }
    assert _post(f"{base}/v1/completions", body).status_code == 200
    # A model trained on Python source answers JSON when the schema says so (enforced decoding).
    schema = {
        "type": "object",
        "properties": {"answer": {"enum": ["yes", "no"]}, "sure": {"type": "boolean"}},
        "required": ["answer", "sure"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "yn", "schema": schema}}
    r = _post(
        f"{base}/v1/completions",
        {"model": model, "prompt": "def f():", "max_tokens": 64, "response_format": fmt},
    )
    assert r.status_code == 200, r.text
    document = json.loads(r.json()["choices"][0]["text"])
    assert document["answer"] in ("yes", "no") and isinstance(document["sure"], bool), document
    # vLLM's guided_choice and guided_regex extensions.
    for guided, accept in (
        ({"guided_choice": ["maybe", "never"]}, lambda t: t in ("maybe", "never")),
        ({"guided_regex": "[0-9]{3}-[A-Z]{2}"}, lambda t: re.fullmatch("[0-9]{3}-[A-Z]{2}", t)),
    ):
        r = _post(f"{base}/v1/completions", {"model": model, "prompt": "x =", "max_tokens": 16, **guided})
        assert r.status_code == 200 and accept(r.json()["choices"][0]["text"]), r.text
    _check_usage_chunk(base, model)


def _check_body_limit(base: str, model: str) -> None:
    """10 MB refused with 413, whether announced by Content-Length or sent chunked, and the
    server stays responsive (a liveness probe would not restart it)."""
    huge = b'{"model": "' + model.encode() + b'", "prompt": "' + b"x" * 10_000_000 + b'"}'
    started = time.monotonic()
    r = httpx.post(f"{base}/v1/completions", content=huge, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(huge), 1 << 20):
            yield huge[i : i + (1 << 20)]

    r = httpx.post(
        f"{base}/v1/completions", content=chunks(), headers={"content-type": "application/json"}, timeout=30
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
    assert httpx.get(f"{base}/healthz", timeout=2).status_code == 200
    assert time.monotonic() - started < 10


@pytest.mark.slow
def test_edge_refuses_bad_input_with_4xx(
    demo_package: RegistryEntry,
    edge_factory: Callable[..., EdgeProcess],
    broker_settings: BrokerSettings,
    tenant: str,
    registry: ModelRegistry,
    signing_key: SigningKey,
) -> None:
    edge = serving_edge(
        edge_factory,
        broker=broker_settings,
        tenant=tenant,
        registry=registry,
        trusted=[signing_key.public.b64],
        model=demo_package,
    )
    _check_refusals(edge.api, "demo-glm")
    _check_honoured(edge.api, "demo-glm")
    _check_edges_of_valid_input(edge.api, "demo-glm")
    _check_body_limit(edge.api, "demo-glm")
    ok = httpx.post(
        f"{edge.api}/v1/completions", json={"model": "demo-glm", "prompt": "def ", "max_tokens": 4}
    )
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
    assert "Traceback" not in edge.log_text()


@pytest.mark.slow
def test_pool_refuses_bad_input_with_4xx(demo_source: Path) -> None:
    pool: Service = start_pool(demo_source)
    try:
        _check_refusals(pool.url, "demo-glm")
        _check_honoured(pool.url, "demo-glm")
        _check_edges_of_valid_input(pool.url, "demo-glm")
        _check_body_limit(pool.url, "demo-glm")
        ok = httpx.post(
            f"{pool.url}/v1/completions", json={"model": "demo-glm", "prompt": "def ", "max_tokens": 4}
        )
        assert ok.status_code == 200
    finally:
        pool.stop()
