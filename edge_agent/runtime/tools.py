"""Tool calling: OpenAI ``tools``/``tool_choice`` through the model's chat template and back.

* **Prompt.** The tools go to the chat template as transformers passes them (``tools=``), and
  earlier calls and tool results as messages (``tool_calls`` with their arguments as objects,
  ``role: tool`` with ``tool_call_id``), as vLLM hands them to a template. A template that
  ignores tools (SmolLM2's, say) gets them in a system message in the Hermes format instead, its
  earlier calls written as ``<tool_call>`` blocks and tool results as ``<tool_response>`` blocks in
  a user turn — the convention Qwen2.5's and Hermes' templates use.
* **Decoding.** With ``tool_choice`` ``required`` or a named function, an llguidance grammar
  holds the output to calls in the model's format whose arguments match the function's JSON
  schema; with ``auto`` the model decides.
* **Parsing.** The output is split into content and OpenAI ``tool_calls``, also while streaming:
  text that could begin a call is held back until it is known to be one or not.

Call formats, chosen by the template:

==========  ====================================================================================
hermes      ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, one block per call
            (Qwen2.5, Qwen3, Hermes, SmolLM3 templates, and what is injected for the others)
glm4        ``name\\n{...arguments...}``, one call per turn (GLM-4 chat templates, which give tool
            results the ``<|observation|>`` role)
==========  ====================================================================================
"""

from __future__ import annotations

import functools
import json
import re
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from llguidance import LLMatcher

from edge_agent.runtime.chat import ChatTemplate
from edge_agent.runtime.structured import JSON_OPTIONS, compiled
from shared.errors import InvalidRequest
from shared.openai_api import ChatCompletionRequest, ChatMessage, FunctionCall, ToolCall

_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_HERMES_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_ANY_OBJECT: dict[str, Any] = {"type": "object"}

# The system prompt for templates that ignore tools (Qwen2.5's wording, which Hermes-style models
# were trained on).
_INJECTED = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


class CallFormat(StrEnum):
    HERMES = "hermes"
    GLM4 = "glm4"


def call_format(template: ChatTemplate) -> CallFormat:
    if _OPEN in template.text:
        return CallFormat.HERMES
    if "<|observation|>" in template.text:
        return CallFormat.GLM4
    return CallFormat.HERMES


@dataclass(frozen=True)
class ToolPlan:
    """How one request's tools are offered, constrained and read back."""

    tools: list[dict[str, Any]]  # as OpenAI sends them: {"type": "function", "function": {...}}
    choice: str  # "auto", "required", or the name of the function that must be called
    parallel: bool
    format: CallFormat
    native: bool  # the chat template renders tools itself

    @functools.cached_property
    def names(self) -> frozenset[str]:
        return frozenset(t["function"]["name"] for t in self.tools)

    def grammar(self) -> str | None:
        """The llguidance grammar the output must match (None: the model chooses freely)."""
        if self.choice == "auto":
            return None
        tools = [t for t in self.tools if self.choice == "required" or t["function"]["name"] == self.choice]
        one_call = self.choice != "required" or not self.parallel or self.format is CallFormat.GLM4
        if self.format is CallFormat.GLM4:
            alternatives = " | ".join(
                f"{json.dumps(t['function']['name'] + chr(10))} %json {json.dumps(_schema(t))}" for t in tools
            )
            lark = f"start: {alternatives}"
        else:
            # One alternative per function, its parameters a %json of their own: a schema's
            # "#/$defs/..." (as pydantic writes them) resolves against that schema, not against a
            # wrapper holding every function.
            alternatives = " | ".join(
                f'{json.dumps(_call_head(t))} %json {json.dumps({**_schema(t), "x-guidance": JSON_OPTIONS})} "}}"'
                for t in tools
            )
            calls = "call" if one_call else 'call ("\\n" call)*'
            lark = f'start: {calls}\ncall: "<tool_call>\\n" body "\\n</tool_call>"\nbody: {alternatives}'
        return compiled(LLMatcher.grammar_from_lark, lark, "tools", "tools: a function's parameters schema")

    def split(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """The model's output as (content, tool calls); all content when it holds no valid call."""
        calls = self._calls(text)
        if not calls:
            return text, []
        if self.format is CallFormat.GLM4:
            return None, calls
        content = text[: text.find(_OPEN)].strip()
        return content or None, calls

    def _calls(self, text: str) -> list[ToolCall]:
        found: list[tuple[Any, Any]] = []
        if self.format is CallFormat.GLM4:
            name, newline, rest = text.strip().partition("\n")
            if not newline or name.strip() not in self.names:
                return []
            found.append((name.strip(), _json(rest)))
        else:
            if _OPEN not in text:
                return []
            blocks = _HERMES_BLOCK.findall(text)
            for i, block in enumerate(blocks):
                call = _json(block)
                if not isinstance(call, dict):
                    if i and i == len(blocks) - 1 and not text.rstrip().endswith(_CLOSE):
                        break  # the last call was cut off by max_tokens: the whole ones stand
                    return []
                found.append((call.get("name"), call.get("arguments", call.get("parameters"))))
        calls = []
        for name, arguments in found:
            if isinstance(arguments, str):
                arguments = _json(arguments)
            if name not in self.names or not isinstance(arguments, dict):
                return []  # not a call this request offered: leave the text as the model wrote it
            calls.append(new_call(name, arguments))
        return calls if self.parallel else calls[:1]

    def stream(self) -> CallStream:
        return CallStream(self)


def new_call(name: str, arguments: dict[str, Any]) -> ToolCall:
    return ToolCall(
        id=f"call_{uuid.uuid4().hex[:24]}",
        function=FunctionCall(name=name, arguments=json.dumps(arguments, ensure_ascii=False)),
    )


class CallStream:
    """Content deltas in, the content that may be sent now out; the calls at the end."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self._held = ""
        self._in_call = False
        self._decided = plan.format is CallFormat.HERMES

    def push(self, delta: str) -> str:
        self._held += delta
        if self._in_call:
            return ""
        if not self._decided:  # glm4: a call is a tool's name alone on the first line
            name, newline, _ = self._held.lstrip().partition("\n")
            if not newline and any(n.startswith(name) for n in self.plan.names):
                return ""
            self._decided = True
            if newline and name.strip() in self.plan.names:
                self._in_call = True
                return ""
            return self._release(len(self._held))
        start = self._held.find(_OPEN)
        if start >= 0:
            self._in_call = True
            return self._release(start)
        return self._release(len(self._held) - _partial_suffix(self._held, _OPEN))

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The rest of the content (what was held back and was not a call) and the calls."""
        held, self._held = self._held, ""
        if not self._in_call and self._decided:
            return held, []
        calls = self.plan._calls(held)
        return ("", calls) if calls else (held, [])

    def _release(self, upto: int) -> str:
        out, self._held = self._held[:upto], self._held[upto:]
        return out


def plan_tools(req: ChatCompletionRequest, template: ChatTemplate) -> ToolPlan | None:
    """The request's tool plan (None: no tools offered, or ``tool_choice: none``)."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise InvalidRequest("tool_choice needs tools", param="tool_choice")
        return None
    if choice == "none":
        return None
    names = [t.function.name for t in req.tools]
    if len(set(names)) != len(names):
        raise InvalidRequest("tools: two functions share a name", param="tools")
    wanted: str
    if choice is None or isinstance(choice, str):
        wanted = choice or "auto"
    else:
        wanted = choice.function.name
        if wanted not in names:
            raise InvalidRequest(
                f"tool_choice names {wanted!r}, which is not among the tools", param="tool_choice"
            )
    tools = [t.model_dump(mode="json", exclude_none=True) for t in req.tools]
    return ToolPlan(
        tools=tools,
        choice=wanted,
        parallel=req.parallel_tool_calls is not False,
        format=call_format(template),
        native=template.renders_tools(),
    )


def template_messages(
    messages: list[ChatMessage], template: ChatTemplate, plan: ToolPlan | None
) -> list[dict[str, Any]]:
    """The messages as the chat template is given them; ValueError for a malformed tool turn."""
    native = template.renders_tools()
    names: dict[str, str] = {}  # tool_call_id → function name, for the tool results that follow
    out: list[dict[str, Any]] = []
    for m in messages:
        item: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.role == "assistant" and m.tool_calls:
            calls: list[dict[str, Any]] = []
            blocks: list[str] = []
            for call in m.tool_calls:
                arguments = _json(call.function.arguments)
                if not isinstance(arguments, dict):
                    raise ValueError(f"tool call {call.id!r}: arguments are not a JSON object")
                names[call.id] = call.function.name
                # Templates read the arguments as an object (``| tojson``), as vLLM hands them over.
                function = {"name": call.function.name, "arguments": arguments}
                calls.append({"id": call.id, "type": "function", "function": function})
                blocks.append(_hermes_block(call.function.name, arguments))
            if native:
                item["tool_calls"] = calls
            else:
                item["content"] = "\n".join(filter(None, [item["content"], *blocks]))
        elif m.role == "tool":
            if m.tool_call_id is None:
                raise ValueError("a tool message needs the tool_call_id it answers")
            name = m.name or names.get(m.tool_call_id)
            if native:
                item.update(tool_call_id=m.tool_call_id, name=name)
            else:
                response = f"<tool_response>\n{item['content']}\n</tool_response>"
                if out and out[-1].get("_tool_results"):
                    out[-1]["content"] += "\n" + response
                    continue
                item = {"role": "user", "content": response, "_tool_results": True}
        out.append(item)
    for item in out:
        item.pop("_tool_results", None)
    if plan is not None and not native:
        listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in plan.tools)
        block = _INJECTED.format(tools=listing)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{block}".strip()}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


def _hermes_block(name: str, arguments: dict[str, Any]) -> str:
    return f"{_OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{_CLOSE}"


def _call_head(tool: dict[str, Any]) -> str:
    """A call's text up to its arguments, compact as structured output writes JSON."""
    return '{"name":' + json.dumps(tool["function"]["name"]) + ',"arguments":'


def _schema(tool: dict[str, Any]) -> dict[str, Any]:
    """The arguments' schema: always of an object (one that names no type would let the model
    write a string or a list, which is never returned as a call)."""
    parameters = tool["function"].get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        return dict(_ANY_OBJECT)
    return parameters if "type" in parameters else {**parameters, "type": "object"}


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of ``text`` that begins ``marker`` (it may yet become one)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
