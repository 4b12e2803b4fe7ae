"""Tool calling (edge_agent/runtime/tools.py): tools into the prompt, calls out of the text.

The grammar that forces a call is exercised with random logits in tests/test_structured.py and
with SmolLM2 through the API in tests/test_real_model.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edge_agent.runtime.chat import ChatTemplate
from edge_agent.runtime.tools import CallFormat, ToolPlan, plan_tools, template_messages
from shared.errors import InvalidRequest
from shared.openai_api import ChatCompletionRequest

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
# SmolLM2's template: roles and content only, tools unknown to it.
PLAIN = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The parts of Qwen2.5's template that matter here: it lists the tools and renders calls and results.
QWEN_LIKE = (
    "{% if tools %}<|im_start|>system\n# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}"
    "\n</tools><|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}"
    "\n</tool_response><|im_end|>\n{% elif m.tool_calls %}<|im_start|>assistant\n{% for c in m.tool_calls %}"
    '<tool_call>\n{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}\n'
    "</tool_call>{% endfor %}<|im_end|>\n{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GLM_LIKE = (
    "{% for m in messages %}{% if m.role == 'tool' %}<|observation|>\n{{ m.content }}"
    "{% else %}<|{{ m.role }}|>\n{{ m.content }}{% endif %}{% endfor %}<|assistant|>"
)


def _template(tmp_path: Path, source: str) -> ChatTemplate:
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": source, "eos_token": "<|im_end|>"})
    )
    return ChatTemplate.from_folder(tmp_path)


def _request(**fields: Any) -> ChatCompletionRequest:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [WEATHER, TIME],
    }
    return ChatCompletionRequest.model_validate({**body, **fields})


def _plan(fmt: CallFormat = CallFormat.HERMES, parallel: bool = True) -> ToolPlan:
    return ToolPlan([WEATHER, TIME], "auto", parallel, fmt, False)


def test_hermes_calls_are_parsed_with_the_content_before_them() -> None:
    text = (
        'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": "{\\"zone\\": \\"CET\\"}"}\n</tool_call>'
    )
    content, calls = _plan().split(text)
    assert content == "Let me look."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"zone": "CET"}),
    ]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)
    # parallel_tool_calls false: the first call only.
    assert len(_plan(parallel=False).split(text)[1]) == 1
    # A call cut short by max_tokens still parses when its JSON is whole; one cut inside its JSON is
    # dropped, and the whole calls before it stand.
    cut = _plan().split('<tool_call>\n{"name": "get_time", "arguments": {}}')
    assert cut[1][0].function.name == "get_time"
    content, calls = _plan().split(text + '\n<tool_call>\n{"name": "get_weather", "argu')
    assert content == "Let me look." and len(calls) == 2


@pytest.mark.parametrize(
    "text",
    [
        "It is sunny in Paris.",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": \n</tool_call>',  # broken JSON
        '<tool_call>\n{"name": "launch_rockets", "arguments": {}}\n</tool_call>',  # not offered
        '<tool_call>\n{"name": "get_weather", "arguments": [1]}\n</tool_call>',  # not an object
    ],
)
def test_text_that_is_no_valid_call_stays_content(text: str) -> None:
    assert _plan().split(text) == (text, [])


def test_glm4_calls_are_a_name_line_and_arguments() -> None:
    plan = _plan(CallFormat.GLM4)
    content, calls = plan.split('get_weather\n{"city": "Paris"}')
    assert content is None and json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert plan.split("get_weather is a function I know.") == ("get_weather is a function I know.", [])


def _streamed(plan: ToolPlan, deltas: list[str]) -> tuple[list[str], str, list[str]]:
    stream = plan.stream()
    sent = [stream.push(d) for d in deltas]
    tail, calls = stream.finish()
    return sent, tail, [c.function.name for c in calls]


def test_streamed_content_goes_out_at_once_and_a_call_is_held_until_whole() -> None:
    deltas = [
        "Let me ",
        "look.\n<tool",
        '_call>\n{"name": "get_weather", ',
        '"arguments": {"city": "Oslo"}}',
        "\n</tool_call>",
    ]
    sent, tail, calls = _streamed(_plan(), deltas)
    # "<tool" might begin a call: held back until it is known to; nothing of the call goes out.
    assert sent == ["Let me ", "look.\n", "", "", ""]
    assert (tail, calls) == ("", ["get_weather"])
    # A "<" that begins no call is released as soon as that is clear.
    sent, tail, calls = _streamed(_plan(), ["a <", "b> c"])
    assert "".join(sent) + tail == "a <b> c" and calls == []
    # A call that turns out broken is given back as content at the end.
    sent, tail, calls = _streamed(_plan(), ["<tool_call>\n{oops"])
    assert (sent, tail, calls) == ([""], "<tool_call>\n{oops", [])


def test_streamed_glm4_waits_for_the_first_line() -> None:
    sent, tail, calls = _streamed(_plan(CallFormat.GLM4), ["get_", "weather\n", '{"city": "Rome"}'])
    assert (sent, tail, calls) == (["", "", ""], "", ["get_weather"])
    sent, tail, calls = _streamed(_plan(CallFormat.GLM4), ["get", " well soon", "!"])
    assert "".join(sent) + tail == "get well soon!" and calls == []


def test_a_template_without_tools_gets_them_injected_with_calls_and_results_in_hermes_form(
    tmp_path: Path,
) -> None:
    template = _template(tmp_path, PLAIN)
    assert not template.renders_tools()
    req = _request(
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "a",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    },
                    {
                        "id": "b",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "a", "content": "sunny"},
            {"role": "tool", "tool_call_id": "b", "content": "rainy"},
        ]
    )
    plan = plan_tools(req, template)
    assert plan is not None and plan.format is CallFormat.HERMES and not plan.native
    messages = template_messages(req.messages, template, plan)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"].startswith("Be brief.\n\n# Tools")
    assert json.dumps(WEATHER) in messages[0]["content"]
    assert messages[2]["content"] == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    )
    assert (
        messages[3]["content"]
        == "<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrainy\n</tool_response>"
    )


def test_a_template_with_tools_renders_them_itself(tmp_path: Path) -> None:
    template = _template(tmp_path, QWEN_LIKE)
    assert template.renders_tools()
    called = {
        "id": "a",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    req = _request(
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [called]},
            {"role": "tool", "tool_call_id": "a", "content": "sunny"},
        ]
    )
    plan = plan_tools(req, template)
    assert plan is not None and plan.native
    messages = template_messages(req.messages, template, plan)
    # As transformers and vLLM hand them to a template: arguments as an object, the call's name
    # beside its result.
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert messages[2] == {"role": "tool", "content": "sunny", "tool_call_id": "a", "name": "get_weather"}
    text = template.render(messages, tools=plan.tools)
    assert '"name": "get_weather"' in text and '{"city": "Paris"}' in text and "sunny" in text


def test_glm_templates_call_in_their_own_format(tmp_path: Path) -> None:
    plan = plan_tools(_request(), _template(tmp_path, GLM_LIKE))
    assert plan is not None and plan.format is CallFormat.GLM4


def test_tool_choice_is_checked_against_the_tools(tmp_path: Path) -> None:
    template = _template(tmp_path, PLAIN)
    assert plan_tools(_request(tool_choice="none"), template) is None
    assert plan_tools(_request(tools=None), template) is None
    named = plan_tools(_request(tool_choice={"type": "function", "function": {"name": "get_time"}}), template)
    assert named is not None and named.choice == "get_time"
    for fields in (
        {"tool_choice": {"type": "function", "function": {"name": "nope"}}},
        {"tools": None, "tool_choice": "required"},
        {"tools": [WEATHER, WEATHER]},
    ):
        with pytest.raises(InvalidRequest):
            plan_tools(_request(**fields), template)
