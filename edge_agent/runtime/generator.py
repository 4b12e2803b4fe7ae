"""The KV-cache generation loop: prompt in, text deltas out, with stop sequences and limits."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from tokenizers import Tokenizer

from edge_agent.runtime.sampling import SamplingConfig, choose_token
from edge_agent.runtime.session import OnnxCausalLM
from shared.errors import InferenceError

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int = 16
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class GenerationResult:
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: FinishReason = "length"


class TextGenerator:
    """Drives an :class:`OnnxCausalLM` with a tokenizer; not thread-safe (callers serialize)."""

    def __init__(self, model: OnnxCausalLM, tokenizer: Tokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(model.io.eos_token_ids)
        self.context_length = model.io.context_length

    def check_prompt(self, prompt: str) -> list[int]:
        """Token ids of ``prompt``; InferenceError when it is empty or does not fit the context."""
        prompt_ids: list[int] = self.tokenizer.encode(prompt).ids
        if not prompt_ids:
            raise InferenceError("prompt encodes to zero tokens", param="prompt")
        room = self.context_length - len(prompt_ids)
        if room <= 0:
            raise InferenceError(
                f"prompt has {len(prompt_ids)} tokens; the local context holds {self.context_length}",
                param="prompt",
                code="context_length_exceeded",
            )
        return prompt_ids

    def token_ids(self, prompt_ids: list[int], budget: int, params: GenerationParams) -> Iterator[int]:
        """The decode loop: one new token id per step, until EOS (not yielded) or ``budget`` tokens."""
        rng = np.random.default_rng(params.seed)
        decoder = self.model.decoder(len(prompt_ids) + budget)
        step = prompt_ids
        for _ in range(budget):
            logits = decoder.step(step)
            token = choose_token(logits[-1], params.sampling, rng)
            if token in self.eos_ids:
                return
            yield token
            step = [token]

    def stream(self, prompt: str, params: GenerationParams) -> Iterator[str | GenerationResult]:
        """Yield text deltas as they become final, then one GenerationResult."""
        prompt_ids = self.check_prompt(prompt)
        budget = min(params.max_tokens, self.context_length - len(prompt_ids))
        result = GenerationResult(prompt_tokens=len(prompt_ids), finish_reason="stop")
        generated: list[int] = []
        emitted = ""
        holdback = max((len(s) for s in params.stop), default=1) - 1
        stopped_on_sequence = False
        for token in self.token_ids(prompt_ids, budget, params):
            generated.append(token)
            text = self.tokenizer.decode(generated)
            cut = _first_stop(text, params.stop)
            if cut is not None:
                stopped_on_sequence = True
                text = text[:cut]
                if len(text) > len(emitted):
                    yield text[len(emitted) :]
                emitted = text
                break
            # Hold back an incomplete UTF-8 sequence and anything that may begin a stop sequence.
            safe = len(text.rstrip("\ufffd")) - holdback
            if safe > len(emitted):
                yield text[len(emitted) : safe]
                emitted = text[:safe]
        if not stopped_on_sequence:
            if len(generated) == budget:
                result.finish_reason = "length"
            final = self.tokenizer.decode(generated)
            if len(final) > len(emitted):
                yield final[len(emitted) :]
            emitted = final
        result.text = emitted
        result.completion_tokens = len(generated)
        yield result

    def generate(self, prompt: str, params: GenerationParams) -> GenerationResult:
        for item in self.stream(prompt, params):
            if isinstance(item, GenerationResult):
                return item
        raise AssertionError("stream ended without a result")  # pragma: no cover


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None
