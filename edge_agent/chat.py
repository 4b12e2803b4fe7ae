"""Chat messages → one prompt string, with the model's own chat template when it ships one.

Hugging Face models carry a Jinja template in ``tokenizer_config.json`` (``chat_template``) or in
``chat_template.jinja``; it is rendered in Jinja's sandbox, as transformers does. A model without
one gets a plain role-tagged transcript, and generation stops where the model starts a new turn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.errors import InferenceError, ModelLoadError

# For models without a template: one line per turn, ending with the assistant's cue.
FALLBACK_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
FALLBACK_STOP = ("<|user|>", "<|system|>", "<|assistant|>")


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    template: Any  # jinja2.Template
    special: dict[str, str]
    stop: tuple[str, ...]

    @classmethod
    def from_folder(cls, folder: Path) -> ChatTemplate:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        config: dict[str, Any] = {}
        cfg_path = folder / "tokenizer_config.json"
        if cfg_path.is_file():
            try:
                config = json.loads(cfg_path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise ModelLoadError(f"tokenizer_config.json is unreadable: {exc}") from exc
        text = config.get("chat_template")
        if isinstance(text, list):  # named templates: use the default one
            text = next((t.get("template") for t in text if t.get("name") == "default"), None)
        jinja_file = folder / "chat_template.jinja"
        if text is None and jinja_file.is_file():
            text = jinja_file.read_text()
        source, stop = ("model", ()) if text else ("fallback", FALLBACK_STOP)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        try:
            template = env.from_string(text or FALLBACK_TEMPLATE)
        except TemplateError as exc:
            raise ModelLoadError(f"the model's chat template does not compile: {exc}") from exc
        special = {}
        for key in ("bos_token", "eos_token"):
            token = _token_text(config.get(key))
            if token is not None:
                special[key] = token
        return cls(source, template, special, stop)

    def render(self, messages: list[dict[str, str]]) -> str:
        from jinja2 import TemplateError

        try:
            return str(self.template.render(messages=messages, add_generation_prompt=True, **self.special))
        except TemplateError as exc:
            raise InferenceError(f"the chat template rejected the messages: {exc}", param="messages") from exc


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _raise(message: str) -> None:
    from jinja2 import TemplateError

    raise TemplateError(message)
