"""Chat messages → one prompt, rendered and encoded exactly as transformers' ``apply_chat_template``.

Hugging Face models carry a Jinja template in ``chat_template.jinja`` (newer transformers) or in
``tokenizer_config.json`` (``chat_template``). It is rendered in the same Jinja sandbox transformers
uses (trim_blocks, lstrip_blocks, loop controls, its ``tojson``, ``raise_exception``,
``strftime_now``) with the tokenizer's special tokens as variables. The rendered text already holds
every special token the model expects (BOS included), so it is encoded WITHOUT the tokenizer's
post-processor (:class:`Prompt` with ``add_special_tokens=False``), as transformers and vLLM do; a
plain completion prompt is encoded the tokenizer's default way. Encoding a templated prompt with
special tokens would put a second BOS in front, and a model answers differently after it.

A model without a template gets a plain role-tagged transcript, and generation stops where the
model starts a new turn.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from edge_agent.runtime.text import Prompt
from shared.errors import InvalidRequest, ModelLoadError, RequestError

# For models without a template: one line per turn, ending with the assistant's cue.
FALLBACK_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
FALLBACK_STOP = ("<|user|>", "<|system|>", "<|assistant|>")
# The special-token variables transformers hands a chat template (its special_tokens_map).
_SPECIAL_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
    "additional_special_tokens",
)
_SENTINEL = "\u2063autoglm-turn-end-probe\u2063"
_TOOL_PROBE = "autoglm_tool_probe"


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    template: Any  # jinja2.Template
    special: dict[str, Any]
    stop: tuple[str, ...]
    text: str = ""  # the template's source (empty for the fallback)

    @classmethod
    def from_folder(cls, folder: Path) -> ChatTemplate:
        from jinja2 import TemplateError

        config = _read_json(folder / "tokenizer_config.json")
        text = config.get("chat_template")
        if isinstance(text, list):  # named templates: use the default one
            text = next((t.get("template") for t in text if t.get("name") == "default"), None)
        jinja_file = folder / "chat_template.jinja"
        if not text and jinja_file.is_file():
            text = jinja_file.read_text()
        source, stop = ("model", ()) if text else ("fallback", FALLBACK_STOP)
        try:
            template = _environment().from_string(text or FALLBACK_TEMPLATE)
        except TemplateError as exc:
            raise ModelLoadError(f"the model's chat template does not compile: {exc}") from exc
        # special_tokens_map.json first, tokenizer_config.json over it (transformers' precedence).
        merged = {**_read_json(folder / "special_tokens_map.json"), **config}
        special: dict[str, Any] = {}
        for key in _SPECIAL_KEYS:
            value = merged.get(key)
            if key == "additional_special_tokens" and isinstance(value, list):
                special[key] = [t for t in (_token_text(v) for v in value) if t is not None]
            elif (token := _token_text(value)) is not None:
                special[key] = token
        return cls(source, template, special, stop, text or "")

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        from jinja2 import TemplateError

        variables = {**self.special, "messages": messages, "add_generation_prompt": add_generation_prompt}
        if tools:
            variables["tools"] = tools
        try:
            return str(self.template.render(**variables))
        except TemplateError as exc:
            raise InvalidRequest(f"the chat template rejected the messages: {exc}", param="messages") from exc

    def prompt(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        *,
        add_generation_prompt: bool = True,
        continue_final: bool = False,
    ) -> Prompt:
        """The prompt for the assistant's next turn, to be encoded without added special tokens.

        ``continue_final``: the last message is an assistant's answer to go on with: the prompt
        ends right after its text, its turn left open (transformers' continue_final_message)."""
        if not continue_final:
            text = self.render(messages, add_generation_prompt=add_generation_prompt, tools=tools)
            return Prompt(text, add_special_tokens=False, param="messages")
        final = str(messages[-1].get("content") or "")
        # Rendered with a marker for the text, so the cut cannot land inside the template's own
        # tokens (a short answer "e" would match in "<|im_end|>").
        marked = [*messages[:-1], {**messages[-1], "content": _SENTINEL}]
        text = self.render(marked, add_generation_prompt=False, tools=tools)
        before, found, _ = text.rpartition(_SENTINEL)
        if found:
            return Prompt(before + final, add_special_tokens=False, param="messages")
        raise InvalidRequest(
            "the chat template does not write the final message's text as given; it cannot be continued",
            param="continue_final_message",
        )

    @functools.cached_property
    def _renders_tools(self) -> bool:
        probe = {"type": "function", "function": {"name": _TOOL_PROBE, "description": "", "parameters": {}}}
        try:
            text = self.render([{"role": "user", "content": "Hi"}], tools=[probe])
        except RequestError:
            return False
        return _TOOL_PROBE in text

    def renders_tools(self) -> bool:
        """The template writes the ``tools`` it is given into the prompt (else they are injected)."""
        return self.source == "model" and self._renders_tools

    def turn_end_text(self) -> str | None:
        """The text the template writes right after an assistant message (``<|im_end|>\\n``, say).

        Its first token is the token the model emits to end its turn; the packager adds it to the
        end-of-turn ids. None when the template closes no turn (the next turn's opener ends it)."""
        if self.source != "model":
            return None
        messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL}]
        try:
            text = self.render(messages, add_generation_prompt=False)
        except RequestError:
            return None
        _, found, after = text.partition(_SENTINEL)
        return after if found and after.strip() else None


def end_of_turn_ids(configured: list[int], tokenizer: Tokenizer, template: ChatTemplate) -> list[int]:
    """Every id that ends the model's turn: the configured EOS ids (the generation config's, one or
    a list), the tokenizer's EOS, and the special token the chat template closes a turn with.
    The packager writes these into the manifest; the pool computes the same from its folder."""
    ids = set(configured)
    eos_text = template.special.get("eos_token")
    if isinstance(eos_text, str) and (eos_id := tokenizer.token_to_id(eos_text)) is not None:
        ids.add(eos_id)
    if (turn_end := turn_end_token_id(template, tokenizer)) is not None:
        ids.add(turn_end)
    return sorted(ids)


def turn_end_token_id(template: ChatTemplate, tokenizer: Tokenizer) -> int | None:
    """The id of the special token that closes an assistant turn in the template, if there is one."""
    after = template.turn_end_text()
    if after is None:
        return None
    ids = tokenizer.encode(after.lstrip(" "), add_special_tokens=False).ids
    if not ids:
        return None
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    token = tokenizer.id_to_token(ids[0])
    return ids[0] if token in special else None


def _environment() -> Any:
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    return env


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # transformers overrides Jinja's tojson, which would HTML-escape <, > and &.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path.name} is unreadable: {exc}") from exc
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _raise(message: str) -> None:
    from jinja2 import TemplateError

    raise TemplateError(message)
