"""Continuous batching over a full-precision Hugging Face causal LM (PyTorch).

One engine thread owns the model. Between two decode steps it admits waiting requests (each is
prefilled alone, then its KV cache is left-padded into the batch's) and drops finished ones, so
a short request never waits for a long one and a new one never waits for a whole batch:

    waiting queue ──admit/prefill──► batch KV cache [B, heads, L, dim] ──decode step──► B tokens
                                        ▲  left padding + attention mask keep rows aligned
                                        └── finished rows removed (batch_select_indices)

Text handling (stop sequences, UTF-8 hold-back) and sampling are the edge's own
(``IncrementalText``, ``choose_token``), so a request falls back to the cloud without changing
what it means. Asyncio callers read their items from a ``GenerationChannel``.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edge_agent.runtime.channel import GenerationChannel, Item
from edge_agent.runtime.chat import ChatTemplate, end_of_turn_ids
from edge_agent.runtime.generator import (
    GenerationParams,
    GenerationResult,
    StreamItem,
    answer_logprobs,
    check_logit_bias,
    scored_delta,
    token_budget,
)
from edge_agent.runtime.logprobs import Scorer
from edge_agent.runtime.sampling import choose_token
from edge_agent.runtime.structured import Constrained, GrammarTokenizers
from edge_agent.runtime.text import IncrementalText, Prompt
from shared.errors import EngineError, InvalidRequest, ModelLoadError, QueueFull
from shared.openai_api import FinishReason

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolModel:
    """What the OpenAI layer needs to know of the served model."""

    model_id: str
    names: frozenset[str]
    chat: ChatTemplate
    context_length: int
    # The pool artifact it was fetched from ('' for a hand-filled folder: nothing to pin to).
    digest: str = ""


@dataclass
class _Request:
    prompt_ids: list[int]
    params: GenerationParams
    emit: Callable[[Item], None]
    cancelled: threading.Event
    submitted: float
    constraint: Constrained | None = None
    released: bool = False


@dataclass(frozen=True)
class Admitted:
    """A request checked at admission (off the event loop): its prompt's ids, its parameters and
    its grammar's state (whose first mask is known to work; used by this request alone)."""

    ids: list[int]
    params: GenerationParams
    constraint: Constrained | None


@dataclass
class _Row:
    """A sequence in the running batch."""

    req: _Request
    text: IncrementalText
    budget: int
    rng: np.random.Generator
    position: int  # positions this sequence has in the cache (prompt + generated so far)
    last_token: int = -1
    done: bool = False
    finish: Literal["stop", "length", "cancelled", "failed"] = "length"
    # Tokens generated so far, for presence/frequency penalties.
    counts: Counter[int] = field(default_factory=Counter)
    # The request's response_format grammar, if it has one.
    constraint: Constrained | None = None
    # The request's logprobs, if it asked for them.
    scorer: Scorer | None = None


@dataclass
class EngineStats:
    """Read by /metrics (gauges and counters) and the benchmark."""

    batch_size: int = 0
    requests_done: int = 0
    rejected: int = 0
    tokens_generated: int = 0
    decode_steps: int = 0
    recent_tokens: collections.deque[tuple[float, int]] = field(
        default_factory=lambda: collections.deque(maxlen=256)
    )

    def tokens_per_s(self, window_s: float = 10.0) -> float:
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self.recent_tokens) if now - t <= window_s]
        if len(recent) < 2:
            return 0.0
        span = max(now - recent[0][0], 1e-6)
        return sum(n for _, n in recent) / span


def pick_device(wanted: str) -> tuple[str, Any]:
    """("cuda", bfloat16) when a GPU is there (or asked for), else ("cpu", float32)."""
    import torch

    if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ModelLoadError("device 'cuda' was asked for but torch sees no CUDA device")
        return "cuda", torch.bfloat16
    return "cpu", torch.float32


class BatchEngine:
    """The model, its tokenizer and the engine thread; ``submit`` is the only way in."""

    def __init__(
        self,
        model_dir: Path,
        *,
        name: str | None = None,
        version: str | None = None,
        digest: str = "",
        device: str = "auto",
        max_batch: int = 32,
        queue_size: int = 256,
        threads: int = 0,
        on_first_token: Callable[[float], None] | None = None,
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not (model_dir / "config.json").is_file():
            raise ModelLoadError("not a Hugging Face model folder (no config.json)", path=str(model_dir))
        if threads:
            torch.set_num_threads(threads)
        self.device, self.dtype = pick_device(device)
        try:
            # SDPA, because the decode step hands it a prepared boolean mask (see _decode).
            loaded: Any = AutoModelForCausalLM.from_pretrained(
                str(model_dir), dtype=self.dtype, local_files_only=True, attn_implementation="sdpa"
            )
            self.model: Any = loaded.to(self.device)
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load the model: {exc}", path=str(model_dir)) from exc
        self.model.eval()
        if not getattr(tokenizer, "is_fast", False):
            raise ModelLoadError("the pool needs a fast (tokenizers) tokenizer", path=str(model_dir))
        self.tokenizer = tokenizer.backend_tokenizer
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)  # slow: counted once
        cfg = self.model.config
        context = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        served = name or model_dir.name
        versioned = f"{served}:{version}" if version else served
        self.info = PoolModel(
            model_id=versioned,
            names=frozenset({served, versioned}),
            chat=ChatTemplate.from_folder(model_dir),
            context_length=int(context or 2048),
            digest=digest,
        )
        self.eos_ids = frozenset(end_of_turn_ids(_eos_ids(model_dir, cfg), self.tokenizer, self.info.chat))
        self.grammar_tokenizer = GrammarTokenizers(self.tokenizer, self.eos_ids)
        self.max_batch = max_batch
        self.queue_size = queue_size
        self.stats = EngineStats()
        self.on_first_token = on_first_token
        self._waiting: collections.deque[_Request] = collections.deque()
        self._in_flight = 0  # waiting + generating
        self._wake = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="pool-engine", daemon=True)

    # -- the asyncio side --------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=30)

    @property
    def waiting(self) -> int:
        """Requests queued for a place in the batch (not those whose clients left)."""
        return sum(1 for r in tuple(self._waiting) if not r.cancelled.is_set())

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def check_prompt(self, prompt: Prompt, params: GenerationParams) -> Admitted:
        """Token ids of ``prompt``, checked against the context, and the request's grammar state
        (CPU work: off the event loop). Anything refused here is the request's 400, before the
        engine thread, where a failure would fail the whole batch."""
        ids = prompt.encode(self.tokenizer)
        if not ids:
            raise InvalidRequest("prompt encodes to zero tokens", param=prompt.param)
        token_budget(len(ids), self.info.context_length, params, "model's", prompt.param)
        check_logit_bias(params, self.vocab_size)
        grammar = params.grammar
        return Admitted(
            ids,
            params,
            Constrained(self.grammar_tokenizer.get(), grammar, params.grammar_param) if grammar else None,
        )

    def submit(self, prompt: Prompt, params: GenerationParams) -> AsyncIterator[StreamItem]:
        """Queue a request (429 at once when the queue is full); iterate for its text deltas."""
        return self.submit_admitted(self.check_prompt(prompt, params))

    def submit_admitted(self, admitted: Admitted) -> AsyncIterator[StreamItem]:
        """``submit`` for a request already checked by :meth:`check_prompt`."""
        channel = GenerationChannel()
        req = _Request(
            admitted.ids, admitted.params, channel.put, channel.cancelled, 0.0, admitted.constraint
        )
        with self._wake:
            # Room for a full batch plus queue_size waiting, however fast the engine takes them in.
            if self._in_flight >= self.max_batch + self.queue_size:
                self._drop_gone()
            if self._in_flight >= self.max_batch + self.queue_size:
                self.stats.rejected += 1
                raise QueueFull(
                    f"the pool is full ({self.max_batch} generating, {self.queue_size} waiting); retry later",
                    retry_after_s=1,
                )
            req.submitted = time.monotonic()
            self._in_flight += 1
            self._waiting.append(req)
            self._wake.notify()

        # A client that went away (channel cancelled) frees its row at the next step.
        return channel.items()

    # -- the engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        import torch

        rows: list[_Row] = []
        cache: Any = None
        mask: Any = None  # [B, L] attention mask over the cache positions
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._stop and not rows and not self._waiting:
                        self._wake.wait()
                    if self._stop:
                        break
                    self._drop_gone()  # clients that left while waiting: not prefilled
                    taken: list[_Request] = []
                    while self._waiting and len(rows) + len(taken) < self.max_batch:
                        taken.append(self._waiting.popleft())
                try:
                    for req in taken:
                        row, row_cache = self._prefill(req)
                        if row.done:
                            self._finish(row)
                            continue
                        rows.append(row)
                        cache, mask = _merge(cache, mask, row_cache, self.device)
                    self.stats.batch_size = len(rows)
                    if rows:
                        cache, mask = self._decode(rows, cache, mask)
                        rows, cache, mask = self._drop_finished(rows, cache, mask)
                        self.stats.batch_size = len(rows)
                except Exception as exc:  # a broken step fails its requests, not the server
                    failed = {id(r.req): r.req for r in rows} | {id(q): q for q in taken if not q.released}
                    log.exception("decode step failed; failing %d request(s)", len(failed))
                    error = EngineError(f"generation failed: {exc}")
                    for req in failed.values():
                        req.emit(error)
                        self._release(req)
                    rows, cache, mask = [], None, None
                    self.stats.batch_size = 0

    def _prefill(self, req: _Request) -> tuple[_Row, Any]:
        import torch

        ids = torch.tensor([req.prompt_ids], device=self.device)
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        # Checked at admission (check_prompt); here only the room left, so nothing in the engine
        # thread can fail the whole batch over one request's parameters.
        budget = min(req.params.max_tokens, self.info.context_length - len(req.prompt_ids))
        row = _Row(
            req=req,
            # A constrained answer ends where its grammar does (as on the edge: a stop string
            # would cut the document mid-value).
            text=IncrementalText(self.tokenizer, () if req.constraint is not None else req.params.stop),
            budget=budget,
            rng=np.random.default_rng(req.params.seed),
            position=len(req.prompt_ids),
            constraint=req.constraint,
            scorer=(
                Scorer(req.params.logprobs, self.grammar_tokenizer.token_bytes)
                if req.params.logprobs is not None
                else None
            ),
        )
        self._accept_or_fail(row, out.logits[0, -1:, :], first=True)
        return row, out.past_key_values

    def _decode(self, rows: list[_Row], cache: Any, mask: Any) -> tuple[Any, Any]:
        import torch

        tokens = torch.tensor([[r.last_token] for r in rows], device=self.device)
        positions = torch.tensor([[r.position] for r in rows], device=self.device)
        mask = torch.cat([mask, torch.ones((len(rows), 1), dtype=mask.dtype, device=self.device)], dim=1)
        # One query position per row: its mask is just "the row's real positions", so it is passed
        # ready-made ([B, 1, 1, L], True = attend, SDPA's convention); transformers would otherwise
        # rebuild a padded causal mask with vmap every step, which costs more than the model here.
        ready = None if bool(mask.all()) else mask[:, None, None, :].bool()
        out = self.model(
            input_ids=tokens,
            attention_mask=ready,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        )
        logits = out.logits[:, -1, :]
        greedy = logits.argmax(dim=-1).tolist()
        self.stats.decode_steps += 1
        for i, row in enumerate(rows):
            row.position += 1
            self._accept_or_fail(row, logits[i : i + 1], first=False, greedy_token=greedy[i])
        self.stats.recent_tokens.append((time.monotonic(), len(rows)))
        return out.past_key_values, mask

    def _accept_or_fail(
        self, row: _Row, logits: Any, *, first: bool, greedy_token: int | None = None
    ) -> None:
        """:meth:`_accept`; a failure of this row's own (its grammar, its logprobs, its text) ends
        this request with the error, not the whole batch."""
        try:
            self._accept(row, logits, first=first, greedy_token=greedy_token)
        except Exception as exc:
            log.warning(
                "generation failed for one request: %s", exc, exc_info=not isinstance(exc, EngineError)
            )
            row.req.emit(exc if isinstance(exc, EngineError) else EngineError(f"generation failed: {exc}"))
            row.done, row.finish = True, "failed"

    def _accept(self, row: _Row, logits: Any, *, first: bool, greedy_token: int | None = None) -> None:
        """Choose the next token of ``row`` from its logits [1, vocab]; emit text; mark it done."""
        params = row.req.params
        if row.req.cancelled.is_set():
            row.done, row.finish = True, "cancelled"
            return
        raw = None
        if params.sampling.greedy and not params.sampling.adjusts and row.constraint is None:
            token = greedy_token if greedy_token is not None else int(logits[0].argmax())
        else:
            raw = scores = logits[0].float().cpu().numpy()
            if row.constraint is not None:
                scores = row.constraint.mask(scores)
            token = choose_token(scores, params.sampling, row.rng, row.counts)
        if first and self.on_first_token is not None:
            self.on_first_token(time.monotonic() - row.req.submitted)
        if token in self.eos_ids:
            row.done, row.finish = True, "stop"
            return
        self.stats.tokens_generated += 1
        row.counts[token] += 1
        if row.constraint is not None:
            row.constraint.accept(token)
        if row.scorer is not None:
            row.scorer.add(raw if raw is not None else logits[0].float().cpu().numpy(), token)
        if first:
            self.stats.recent_tokens.append((time.monotonic(), 1))
        row.last_token = token
        delta = row.text.push(token)
        if delta:
            for item in scored_delta(row.scorer, delta, _ids(row), row.text.covered()):
                row.req.emit(item)
        if row.text.stopped or (row.constraint is not None and row.constraint.complete):
            row.done, row.finish = True, "stop"
        elif len(row.text.tokens) >= row.budget:
            row.done, row.finish = True, "length"

    def _drop_gone(self) -> None:
        """Give back the places of waiting requests whose clients left (``_wake`` held): at
        admission, and when the queue looks full (they counted against it until a row freed, and
        newcomers got 429s meanwhile)."""
        kept: collections.deque[_Request] = collections.deque()
        gone: list[_Request] = []
        for req in self._waiting:  # one look at each flag: a request is kept or released, never lost
            (gone if req.cancelled.is_set() else kept).append(req)
        if gone:
            self._waiting = kept
            for req in gone:
                self._release(req)

    def _release(self, req: _Request) -> None:
        with self._wake:  # from the engine thread and from the event loop (_drop_gone)
            if req.released:
                return
            req.released = True
            self._in_flight -= 1
            self.stats.requests_done += 1

    def _finish(self, row: _Row) -> None:
        self._release(row.req)
        if row.finish in ("cancelled", "failed"):
            return
        tail = row.text.finish()
        if tail:
            for item in scored_delta(row.scorer, tail, _ids(row)):
                row.req.emit(item)
        reason: FinishReason = "length" if row.finish == "length" else "stop"
        logprobs = answer_logprobs(row.scorer, row.text)
        row.req.emit(
            GenerationResult(
                row.text.emitted,
                len(row.req.prompt_ids),
                len(row.text.tokens),
                reason,
                logprobs,
                token_ids=list(row.text.tokens),
            )
        )

    def _drop_finished(self, rows: list[_Row], cache: Any, mask: Any) -> tuple[list[_Row], Any, Any]:
        keep = [i for i, r in enumerate(rows) if not r.done]
        for r in rows:
            if r.done:
                self._finish(r)
        if len(keep) == len(rows):
            return rows, cache, mask
        if not keep:
            return [], None, None
        index = _index(keep, self.device)
        cache.batch_select_indices(index)
        mask = mask[index]
        # Columns no remaining row uses (left padding of a longer, finished row) are cut away.
        unused = int((mask.cumsum(dim=1) == 0).all(dim=0).sum())
        if unused:
            cache = _slice_cache(cache, unused)
            mask = mask[:, unused:]
        return [rows[i] for i in keep], cache, mask


def _index(keep: list[int], device: str) -> Any:
    import torch

    return torch.tensor(keep, device=device)


def _layers(cache: Any) -> list[tuple[Any, Any]]:
    return [(k, v) for k, v in cache.to_legacy_cache()]


def _rebuild(layers: list[tuple[Any, Any]]) -> Any:
    from transformers import DynamicCache

    return DynamicCache.from_legacy_cache(tuple(layers))  # type: ignore[arg-type]


def _slice_cache(cache: Any, start: int) -> Any:
    return _rebuild([(k[:, :, start:, :], v[:, :, start:, :]) for k, v in _layers(cache)])


def _merge(cache: Any, mask: Any, row_cache: Any, device: str) -> tuple[Any, Any]:
    """Append one prefilled sequence to the batch, left-padding whichever side is shorter."""
    import torch
    import torch.nn.functional as F

    new_layers = _layers(row_cache)
    new_len = new_layers[0][0].shape[2]
    new_mask = torch.ones((1, new_len), dtype=torch.long, device=device)
    if cache is None:
        return _rebuild(new_layers), new_mask
    old_layers = _layers(cache)
    old_len = old_layers[0][0].shape[2]
    length = max(old_len, new_len)

    def pad(t: Any, to: int) -> Any:  # [B, H, L, D] → left-padded to [B, H, to, D]
        return F.pad(t, (0, 0, to - t.shape[2], 0)) if t.shape[2] < to else t

    layers = [
        (torch.cat([pad(ok, length), pad(nk, length)]), torch.cat([pad(ov, length), pad(nv, length)]))
        for (ok, ov), (nk, nv) in zip(old_layers, new_layers, strict=True)
    ]
    mask = torch.cat([F.pad(mask, (length - old_len, 0)), F.pad(new_mask, (length - new_len, 0))])
    return _rebuild(layers), mask


def _eos_ids(model_dir: Path, cfg: Any) -> list[int]:
    ids: set[int] = set()
    sources: list[Any] = [getattr(cfg, "eos_token_id", None)]
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        try:
            sources.append(json.loads(gen.read_text()).get("eos_token_id"))
        except (OSError, json.JSONDecodeError):
            pass
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return sorted(ids)


def _ids(row: _Row) -> tuple[int, ...] | None:
    """The ids behind the delta about to go out, when the request asked for them."""
    return tuple(row.text.take_ids()) if row.req.params.token_ids else None
