"""The KV-cache generation loop: prompt in, text deltas out, with stop sequences and limits."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from tokenizers import Tokenizer

from edge_agent.runtime.logprobs import Scored, Scorer, TokenLogprob
from edge_agent.runtime.sampling import SamplingConfig, choose_token
from edge_agent.runtime.session import OnnxCausalLM
from edge_agent.runtime.structured import Constrained, GrammarTokenizers
from edge_agent.runtime.text import IncrementalText, Prompt
from shared.errors import ContextTooLong, InvalidRequest
from shared.openai_api import FinishReason


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int = 16
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # The client asked for max_tokens: a prompt that leaves less room is refused (400), as OpenAI
    # and vLLM do, instead of silently clipped; a configured default is clipped to the room left.
    max_tokens_requested: bool = False
    # An llguidance grammar the output must match (response_format json_object / json_schema).
    grammar: str | None = None
    # Report each generated token's logprob with this many alternatives (None: no logprobs).
    logprobs: int | None = None


def token_budget(prompt_tokens: int, context_length: int, params: GenerationParams, where: str) -> int:
    """How many tokens may be generated; RequestError when the prompt (or the asked-for
    max_tokens with it) does not fit ``where``'s context."""
    room = context_length - prompt_tokens
    if room <= 0:
        raise ContextTooLong(
            f"prompt has {prompt_tokens} tokens; the {where} context holds {context_length}", param="prompt"
        )
    if params.max_tokens_requested and params.max_tokens > room:
        raise ContextTooLong(
            f"max_tokens {params.max_tokens} with the prompt's {prompt_tokens} tokens exceeds the "
            f"{where} context of {context_length}; ask for at most {room}",
            param="max_tokens",
        )
    return min(params.max_tokens, room)


@dataclass
class GenerationResult:
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: FinishReason = "length"
    # Every generated token's logprob, when the request asked for them.
    logprobs: list[TokenLogprob] | None = None
    # Prompt tokens whose KV was reused from the previous request (the prefix cache).
    cached_tokens: int = 0


# What a generation stream yields: text deltas, each after the logprobs of its tokens when they
# were asked for, then one result.
StreamItem = str | Scored | GenerationResult


def check_logit_bias(params: GenerationParams, vocab_size: int) -> None:
    """InvalidRequest for a logit_bias naming a token this model's tokenizer does not have."""
    outside = [t for t, _ in params.sampling.logit_bias if t >= vocab_size]
    if outside:
        raise InvalidRequest(
            f"logit_bias names token id(s) {outside[:5]} outside this model's vocabulary of {vocab_size}",
            param="logit_bias",
        )


class TextGenerator:
    """Drives an :class:`OnnxCausalLM` with a tokenizer; not thread-safe (callers serialize)."""

    def __init__(self, model: OnnxCausalLM, tokenizer: Tokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(model.io.eos_token_ids)
        self.context_length = model.io.context_length
        self.grammar_tokenizer = GrammarTokenizers(tokenizer, self.eos_ids)
        self.cached_tokens = 0  # of the current (last) sequence

    def check_prompt(self, prompt: Prompt, params: GenerationParams) -> list[int]:
        """Token ids of ``prompt``; RequestError when it is empty or it (with the asked-for
        max_tokens) does not fit the context. CPU work: call it off the event loop."""
        prompt_ids = prompt.encode(self.tokenizer)
        if not prompt_ids:
            raise InvalidRequest("prompt encodes to zero tokens", param="prompt")
        token_budget(len(prompt_ids), self.context_length, params, "local")
        check_logit_bias(params, self.tokenizer.get_vocab_size(with_added_tokens=True))
        return prompt_ids

    def scorer(self, params: GenerationParams) -> Scorer | None:
        if params.logprobs is None:
            return None
        return Scorer(params.logprobs, self.grammar_tokenizer.token_bytes)

    def token_ids(
        self, prompt_ids: list[int], budget: int, params: GenerationParams, scorer: Scorer | None = None
    ) -> Iterator[int]:
        """The decode loop: one new token id per step, until EOS (not yielded) or ``budget`` tokens;
        ``scorer`` hears each yielded token with its step's raw logits."""
        rng = np.random.default_rng(params.seed)
        constraint = Constrained(self.grammar_tokenizer.get(), params.grammar) if params.grammar else None
        decoder = self.model.decoder(len(prompt_ids) + budget, prompt_ids)
        self.cached_tokens = decoder.past_len
        step = prompt_ids[decoder.past_len :]
        counts: Counter[int] = Counter()
        for _ in range(budget):
            logits = decoder.step(step, last_only=True)
            row = logits[-1] if constraint is None else constraint.mask(logits[-1])
            token = choose_token(row, params.sampling, rng, counts)
            if token in self.eos_ids:
                return
            if constraint is not None:
                constraint.accept(token)
            if scorer is not None:
                scorer.add(logits[-1], token)
            counts[token] += 1
            yield token
            if constraint is not None and constraint.complete:
                return
            step = [token]

    def stream(self, prompt: Prompt, params: GenerationParams) -> Iterator[StreamItem]:
        """Yield text deltas as they become final, then one GenerationResult."""
        return self.stream_ids(self.check_prompt(prompt, params), params)

    def stream_ids(self, prompt_ids: list[int], params: GenerationParams) -> Iterator[StreamItem]:
        """``stream`` for a prompt already encoded and checked by :meth:`check_prompt`."""
        budget = min(params.max_tokens, self.context_length - len(prompt_ids))
        text = IncrementalText(self.tokenizer, params.stop)
        scorer = self.scorer(params)
        for token in self.token_ids(prompt_ids, budget, params, scorer):
            delta = text.push(token)
            if delta:
                yield from scored_delta(scorer, delta)
            if text.stopped:
                break
        tail = text.finish()
        if tail:
            yield from scored_delta(scorer, tail)
        reason: FinishReason = "length" if not text.stopped and len(text.tokens) == budget else "stop"
        yield GenerationResult(
            text.emitted,
            len(prompt_ids),
            len(text.tokens),
            reason,
            scorer.scored if scorer else None,
            self.cached_tokens,
        )

    def generate(self, prompt: Prompt, params: GenerationParams) -> GenerationResult:
        for item in self.stream(prompt, params):
            if isinstance(item, GenerationResult):
                return item
        raise AssertionError("stream ended without a result")  # pragma: no cover


def scored_delta(scorer: Scorer | None, delta: str) -> Iterator[str | Scored]:
    """A text delta, after the logprobs of the tokens that made it when they are being kept."""
    if scorer is not None and (scored := scorer.flush()) is not None:
        yield scored
    yield delta
