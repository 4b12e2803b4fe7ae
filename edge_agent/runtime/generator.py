"""The KV-cache generation loop: prompt in, text deltas out, with stop sequences and limits."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np
from tokenizers import Tokenizer

from edge_agent.runtime.logprobs import Scored, Scorer, TokenLogprob
from edge_agent.runtime.sampling import SamplingConfig, choose_token
from edge_agent.runtime.session import OnnxCausalLM
from edge_agent.runtime.structured import Constrained, GrammarTokenizers
from edge_agent.runtime.text import IncrementalText, Prompt
from shared.errors import ContextTooLong, InvalidRequest
from shared.openai_api import FinishReason

# A long prompt is prefilled in pieces of this many tokens: while one request's prompt is being
# read, the requests decoding beside it (parallel slots) wait one piece, not the whole prompt.
# Every request is fed the same way, alone or not, so its answer does not depend on the company.
PREFILL_CHUNK = 256


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int = 16
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # The client asked for max_tokens: a prompt that leaves less room is refused (400), as OpenAI
    # and vLLM do, instead of silently clipped; a configured default is clipped to the room left.
    max_tokens_requested: bool = False
    # An llguidance grammar the output must match (response_format json_object / json_schema,
    # guided_*, a required or named tool call), and the request field it came from.
    grammar: str | None = None
    grammar_param: str = "response_format"
    # Report each generated token's logprob with this many alternatives (None: no logprobs).
    logprobs: int | None = None
    # Stream the ids behind each text delta (:class:`Tokens` items; vLLM's return_token_ids).
    token_ids: bool = False
    # Continue an answer another server began instead of starting one.
    resume: Resume | None = None


@dataclass(frozen=True)
class Resume:
    """The part of an answer a client already has, from a server that broke off mid-stream.

    ``tokens`` are that server's generated ids when it sent them (vLLM's and our
    ``return_token_ids``): decoding continues from exactly those tokens, so the seam has no
    repeated or missing token. Without them (or when they do not spell ``text``: another
    tokenizer) ``text`` is encoded here. Generated tokens count against max_tokens."""

    text: str
    tokens: tuple[int, ...] | None = None


def token_budget(
    prompt_tokens: int,
    context_length: int,
    params: GenerationParams,
    where: str,
    prompt_param: str = "prompt",
) -> int:
    """How many tokens may be generated; RequestError when the prompt (the request field
    ``prompt_param``), or the asked-for max_tokens with it, does not fit ``where``'s context."""
    room = context_length - prompt_tokens
    if room <= 0:
        raise ContextTooLong(
            f"prompt has {prompt_tokens} tokens; the {where} context holds {context_length}",
            param=prompt_param,
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
    # The generated token ids (end-of-sequence excluded).
    token_ids: list[int] = field(default_factory=list)
    # Ended by the context, not by max_tokens: a server with a longer context could go on.
    context_full: bool = False


@dataclass(frozen=True)
class Tokens:
    """A stream item: the ids generated since the previous one, before the delta they spell."""

    ids: tuple[int, ...]


# What a generation stream yields: text deltas, each after the logprobs and ids of its tokens
# when they were asked for, then one result.
StreamItem = str | Scored | Tokens | GenerationResult


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
        # Counted once: tokenizers builds the whole vocabulary to count it (6 ms for SmolLM2's
        # 49,152, paid by every request's check when it was asked each time).
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.grammar_tokenizer = GrammarTokenizers(tokenizer, self.eos_ids)

    def check_prompt(self, prompt: Prompt, params: GenerationParams) -> list[int]:
        """Token ids of ``prompt``; RequestError when it is empty or it (with the asked-for
        max_tokens) does not fit the context. CPU work: call it off the event loop."""
        prompt_ids = prompt.encode(self.tokenizer)
        if not prompt_ids:
            raise InvalidRequest("prompt encodes to zero tokens", param=prompt.param)
        token_budget(len(prompt_ids), self.context_length, params, "local", prompt.param)
        check_logit_bias(params, self.vocab_size)
        return prompt_ids

    def scorer(self, params: GenerationParams) -> Scorer | None:
        if params.logprobs is None:
            return None
        return Scorer(params.logprobs, self.grammar_tokenizer.token_bytes)

    def sequence(self, prompt_ids: list[int], params: GenerationParams) -> Sequence:
        """The generation state of one request whose prompt :meth:`check_prompt` encoded."""
        return Sequence(self, prompt_ids, params)

    def token_ids(self, prompt_ids: list[int], budget: int, params: GenerationParams) -> Iterator[int]:
        """The decode loop alone: one new token id per step, until EOS (not yielded), ``budget``
        tokens or a completed grammar (stop sequences are not looked for)."""
        seq = Sequence(self, prompt_ids, replace(params, stop=(), logprobs=None), budget=budget, text=False)
        for _ in self._alone(seq):
            if seq.last_token is not None:
                yield seq.last_token

    def stream(self, prompt: Prompt, params: GenerationParams) -> Iterator[StreamItem]:
        """Yield text deltas as they become final, then one GenerationResult."""
        return self.stream_ids(self.check_prompt(prompt, params), params)

    def stream_ids(self, prompt_ids: list[int], params: GenerationParams) -> Iterator[StreamItem]:
        """``stream`` for a prompt already encoded and checked by :meth:`check_prompt`, decoded alone."""
        for items in self._alone(Sequence(self, prompt_ids, params)):
            yield from items

    def _alone(self, seq: Sequence) -> Iterator[list[StreamItem]]:
        """Decode ``seq`` by itself (the parallel slots' batcher is the other way): the items of
        each step that chose a token."""
        decoder = self.model.decoder(seq.capacity, seq.prompt_ids)
        yield seq.start(decoder.past_len)
        while not seq.done:
            feed = seq.pending[:PREFILL_CHUNK]
            logits = decoder.step(feed, last_only=True)
            if seq.consumed(len(feed)):
                yield seq.advance(logits[-1])

    def generate(self, prompt: Prompt, params: GenerationParams) -> GenerationResult:
        for item in self.stream(prompt, params):
            if isinstance(item, GenerationResult):
                return item
        raise AssertionError("stream ended without a result")  # pragma: no cover


class Sequence:
    """One request's generation, advanced a token at a time by whoever runs the model: alone
    (:meth:`TextGenerator.stream_ids`) or in a batched step beside other requests (the parallel
    slots). The same state machine either way, so a request's output does not depend on it.

    Feed ``pending`` (the uncached prompt, then the last token) to the model and hand the
    last position's logits to :meth:`advance`, until ``done``."""

    def __init__(
        self,
        gen: TextGenerator,
        prompt_ids: list[int],
        params: GenerationParams,
        *,
        budget: int | None = None,
        text: bool = True,
    ) -> None:
        self.gen = gen
        self.prompt_tokens = len(prompt_ids)
        self.params = params
        room = gen.context_length - len(prompt_ids)
        self.budget = min(params.max_tokens, room) if budget is None else budget
        self.rng = np.random.default_rng(params.seed)
        self.constraint = (
            Constrained(gen.grammar_tokenizer.get(), params.grammar, params.grammar_param)
            if params.grammar
            else None
        )
        self.counts: Counter[int] = Counter()
        # A constrained answer ends where its grammar does: a stop string inside it (a "," in a
        # JSON value, a word in a tool's arguments) would cut a document that then failed to
        # parse, reported as a whole one (finish_reason "stop").
        stop = () if self.constraint is not None else params.stop
        self.text = IncrementalText(gen.tokenizer, stop) if text else None
        self.scorer = gen.scorer(params)
        self.cached_tokens = 0
        self.generated = 0
        self.last_token: int | None = None
        self.done = False
        self.result: GenerationResult | None = None
        resumed: list[int] = []
        if params.resume is not None and self.text is not None:
            if budget is None and not params.max_tokens_requested:
                # The other server's default, not ours, bounded the answer it began: go on to the
                # end of the turn or of the context rather than stop at our default.
                self.budget = room
            resumed = self._resume(params.resume)
        # What the model is fed before it chooses: the prompt and any answer it continues.
        self.prompt_ids = prompt_ids + resumed
        self.pending: list[int] = list(self.prompt_ids)

    def _resume(self, resume: Resume) -> list[int]:
        """Take over an answer begun elsewhere: its tokens count as generated by this sequence."""
        assert self.text is not None
        tokenizer = self.gen.tokenizer
        tokens = list(resume.tokens) if resume.tokens is not None else None
        if tokens is None or not self.text.resume(tokens, resume.text):
            tokens = tokenizer.encode(resume.text, add_special_tokens=False).ids
            if not self.text.resume(tokens, resume.text):
                raise InvalidRequest("the answer to continue does not encode and decode to itself here")
        if len(tokens) >= self.budget and not (
            self.params.max_tokens_requested and len(tokens) == self.budget
        ):
            raise ContextTooLong(
                f"the answer to continue has {len(tokens)} tokens; {self.budget} fit here after the prompt",
                param="messages",
            )
        if self.constraint is not None:
            for token in tokens:
                try:
                    self.constraint.accept(token)
                except InvalidRequest as exc:
                    raise InvalidRequest(
                        f"the answer to continue does not follow the request's grammar here: {exc}",
                        param=self.params.grammar_param,
                    ) from exc
        self.counts.update(tokens)
        self.generated = len(tokens)
        return tokens

    @property
    def capacity(self) -> int:
        """KV positions this sequence may need."""
        return self.prompt_tokens + self.budget

    def start(self, past_len: int) -> list[StreamItem]:
        """The model holds the first ``past_len`` prompt positions already (the prefix cache)."""
        self.cached_tokens = past_len
        self.pending = list(self.prompt_ids[past_len:])
        return self._finish() if self.generated >= self.budget else []

    def consumed(self, n: int) -> bool:
        """The model took the first ``n`` pending tokens; whether its logits are the last fed
        position's (a long prompt is fed in pieces of PREFILL_CHUNK, and only the last counts)."""
        del self.pending[:n]
        return not self.pending

    def advance(self, logits: np.ndarray) -> list[StreamItem]:
        """Choose the next token from the last fed position's logits; the items to send."""
        self.last_token = None
        row = logits if self.constraint is None else self.constraint.mask(logits)
        token = choose_token(row, self.params.sampling, self.rng, self.counts)
        if token in self.gen.eos_ids:
            return self._finish()
        if self.constraint is not None:
            self.constraint.accept(token)
        if self.scorer is not None:
            self.scorer.add(logits, token)
        self.counts[token] += 1
        self.generated += 1
        self.last_token = token
        self.pending = [token]
        items: list[StreamItem] = []
        stopped = False
        if self.text is not None:
            delta = self.text.push(token)
            if delta:
                items.extend(scored_delta(self.scorer, delta, self._ids(), self.text.covered()))
            stopped = self.text.stopped
        if (
            stopped
            or self.generated >= self.budget
            or (self.constraint is not None and self.constraint.complete)
        ):
            items.extend(self._finish())
        return items

    def _finish(self) -> list[StreamItem]:
        self.done = True
        items: list[StreamItem] = []
        text = self.text
        if text is None:
            return items
        tail = text.finish()
        if tail:
            items.extend(scored_delta(self.scorer, tail, self._ids()))
        reason: FinishReason = "length" if not text.stopped and len(text.tokens) >= self.budget else "stop"
        self.result = GenerationResult(
            text.emitted,
            self.prompt_tokens,
            len(text.tokens),
            reason,
            answer_logprobs(self.scorer, text),
            self.cached_tokens,
            list(text.tokens),
            context_full=reason == "length" and self.budget < self.params.max_tokens,
        )
        items.append(self.result)
        return items

    def _ids(self) -> tuple[int, ...] | None:
        return tuple(self.text.take_ids()) if self.text is not None and self.params.token_ids else None


def answer_logprobs(scorer: Scorer | None, text: IncrementalText) -> list[TokenLogprob] | None:
    """The logprobs of the answer's tokens: after a stop sequence, without the tokens that are the
    stop's (whose text the answer does not hold), as its text is without them."""
    if scorer is None:
        return None
    return scorer.scored[: text.covered()] if text.stopped else scorer.scored


def scored_delta(
    scorer: Scorer | None, delta: str, ids: tuple[int, ...] | None = None, upto: int | None = None
) -> Iterator[str | Scored | Tokens]:
    """A text delta, after the logprobs and the ids of the tokens that made it when they are
    being kept. ``upto``: the tokens with text in what was emitted (``IncrementalText.covered``):
    the logprobs of tokens whose text is held back wait with it, so that a stop sequence's own
    tokens are never sent."""
    if scorer is not None and (scored := scorer.flush(upto)) is not None:
        yield scored
    if ids:
        yield Tokens(ids)
    yield delta
