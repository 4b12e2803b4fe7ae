"""The model being served: loaded from a slot, swapped atomically, run off the event loop.

Up to ``parallel`` requests generate together (the parallel slots: one batched decode step for
all of them, see :mod:`edge_agent.runtime.batcher`). Up to ``queue_size`` more wait their turn in
arrival order; beyond that a request is refused at once with 429 and a Retry-After estimated from
recent request durations, so clients back off instead of piling up.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from edge_agent.runtime.batcher import GATHER_S, DecodeBatcher
from edge_agent.runtime.channel import GenerationChannel
from edge_agent.runtime.chat import ChatTemplate
from edge_agent.runtime.evaluation import foreign_ids, teacher_forced_agreement
from edge_agent.runtime.generator import (
    GenerationParams,
    GenerationResult,
    Sequence,
    StreamItem,
    TextGenerator,
)
from edge_agent.runtime.sampling import SamplingConfig
from edge_agent.runtime.session import OnnxCausalLM
from edge_agent.runtime.text import Prompt
from shared.errors import ModelLoadError, ModelNotReady, QueueFull
from shared.manifest import EvalSet, Manifest
from shared.messages import EvalReport


@dataclass
class LoadedModel:
    manifest: Manifest
    slot: str
    generator: TextGenerator
    chat: ChatTemplate
    threads: int = 0
    # The signed manifest's digest: what a request may pin (``model: "name@sha256:…"``).
    digest: str = ""
    # Made by the host on the first request (it holds the host's settings and statistics).
    batcher: DecodeBatcher | None = None
    # The package's evaluation set (signed with its manifest), when it carries one.
    evaluation: EvalSet | None = None

    @property
    def model_id(self) -> str:
        return f"{self.manifest.name}:{self.manifest.version}"

    @property
    def names(self) -> frozenset[str]:
        return frozenset({self.model_id, self.manifest.name})

    @classmethod
    def load(
        cls,
        folder: Path,
        manifest: Manifest,
        slot: str,
        *,
        threads: int,
        providers: list[str] | None,
        custom_ops: Path | None = None,
        digest: str = "",
    ) -> LoadedModel:
        graph = next((f.path for f in manifest.files if f.role == "graph"), None)
        if graph is None:
            raise ModelLoadError("manifest lists no graph file", name=manifest.name, version=manifest.version)
        session = OnnxCausalLM(
            folder / graph, manifest.io, threads=threads, providers=providers, custom_ops=custom_ops
        )
        try:
            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:
            raise ModelLoadError(f"tokenizer.json cannot be loaded: {exc}", slot=slot) from exc
        chat = ChatTemplate.from_folder(folder)
        evaluation = None
        eval_file = next((f.path for f in manifest.files if f.role == "eval"), None)
        if eval_file is not None:
            try:
                evaluation = EvalSet.model_validate_json((folder / eval_file).read_bytes())
            except (OSError, ValueError) as exc:
                raise ModelLoadError(f"the evaluation set cannot be read: {exc}", slot=slot) from exc
            if foreign := foreign_ids(evaluation, manifest.io.vocab_size):
                raise ModelLoadError(
                    f"the evaluation set holds {foreign} token id(s) outside this model's vocabulary "
                    f"of {manifest.io.vocab_size} (made for another tokenizer)",
                    slot=slot,
                )
        return cls(
            manifest, slot, TextGenerator(session, tokenizer), chat, threads, digest, evaluation=evaluation
        )

    def evaluate(self) -> EvalReport | None:
        """The package's evaluation set on this graph (runtime/evaluation.py); None without one.
        CPU work, before the model serves: call it off the event loop."""
        if self.evaluation is None:
            return None
        agreement, tokens = teacher_forced_agreement(self.generator.model, self.evaluation)
        if tokens == 0:
            return None  # every case is beyond this graph's context
        return EvalReport(
            model=self.model_id,
            reference=self.evaluation.reference,
            cases=len(self.evaluation.cases),
            tokens=tokens,
            agreement=agreement,
            expected=self.evaluation.expected_agreement,
        )

    def smoke_test(self) -> None:
        """One greedy token through the whole path; anything wrong raises ModelLoadError."""
        try:
            self.generator.generate(
                Prompt("Hello"), GenerationParams(max_tokens=2, sampling=SamplingConfig(temperature=0.0))
            )
        except Exception as exc:
            raise ModelLoadError(f"smoke test failed: {exc}", model=self.model_id) from exc


@dataclass
class HostStats:
    """Running totals read by /metrics and /v1/agent."""

    requests_done: int = 0
    rejected_queue_full: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    busy_s: float = 0.0
    last_decode_tok_s: float = 0.0
    # Exponentially weighted request duration, for Retry-After.
    avg_request_s: float = 1.0


class ModelHost:
    def __init__(
        self,
        queue_size: int = 16,
        parallel: int = 4,
        batch_invariant: bool = False,
        gather_s: float = GATHER_S,
    ) -> None:
        self._current: LoadedModel | None = None
        self.queue_size = queue_size
        self.parallel = parallel
        self.batch_invariant = batch_invariant
        self.gather_s = gather_s  # see DecodeBatcher.arriving
        self._admitted = 0  # generating + waiting
        self._count_lock = threading.Lock()  # _admitted is released from the batcher's thread
        self.stats = HostStats()

    @property
    def current(self) -> LoadedModel | None:
        return self._current

    @property
    def width(self) -> int:
        """Requests that generate at once with the current model."""
        model = self._current
        return self._batcher(model).width if model is not None else max(1, self.parallel)

    @property
    def waiting(self) -> int:
        return max(0, self._admitted - self.width)

    @property
    def generating(self) -> int:
        model = self._current
        return model.batcher.active if model is not None and model.batcher is not None else 0

    def swap(self, model: LoadedModel | None) -> LoadedModel | None:
        old, self._current = self._current, model
        return old

    def require(self) -> LoadedModel:
        model = self._current
        if model is None:
            raise ModelNotReady("no model is active on this device yet", retry_after_s=5)
        return model

    def _batcher(self, model: LoadedModel) -> DecodeBatcher:
        if model.batcher is None:
            model.batcher = DecodeBatcher(
                model.generator,
                lambda: self.parallel,
                self._record,
                self._add_busy,
                lambda: self.batch_invariant,
                self.gather_s,
            )
        return model.batcher

    def _admit(self, width: int) -> None:
        with self._count_lock:
            if self._admitted >= width + self.queue_size:
                self.stats.rejected_queue_full += 1
                wait = self.stats.avg_request_s * (self.waiting + 1) / width
                raise QueueFull(
                    f"the local queue is full ({self.queue_size} waiting); retry later",
                    retry_after_s=max(1, math.ceil(wait)),
                )
            self._admitted += 1

    def _release(self) -> None:
        with self._count_lock:
            self._admitted -= 1

    def _add_busy(self, seconds: float) -> None:
        self.stats.busy_s += seconds

    def _record(self, result: GenerationResult, seconds: float, decode_s: float) -> None:
        s = self.stats
        s.requests_done += 1
        s.prompt_tokens += result.prompt_tokens
        s.completion_tokens += result.completion_tokens
        s.avg_request_s = 0.8 * s.avg_request_s + 0.2 * seconds
        if result.completion_tokens > 1 and decode_s > 0:
            s.last_decode_tok_s = (result.completion_tokens - 1) / decode_s

    async def generate(
        self, prompt: Prompt, params: GenerationParams
    ) -> tuple[LoadedModel, GenerationResult]:
        model, channel = await self._submit(prompt, params)
        try:
            async for item in channel.items():
                if isinstance(item, GenerationResult):
                    return model, item
        finally:
            channel.cancelled.set()  # cancelled caller: the request leaves the batch
        raise AssertionError("stream ended without a result")  # pragma: no cover

    async def stream(
        self, prompt: Prompt, params: GenerationParams
    ) -> tuple[LoadedModel, AsyncIterator[StreamItem]]:
        """Validate and admit now (errors before the response starts), generate in the background.

        When the reader stops reading (its client went away), the request leaves the batch at
        the next step and its place goes to the next in line."""
        model, channel = await self._submit(prompt, params)
        return model, _closing(channel)

    async def _submit(
        self, prompt: Prompt, params: GenerationParams
    ) -> tuple[LoadedModel, GenerationChannel]:
        model = self.require()
        batcher = self._batcher(model)
        # Announced while its prompt is tokenized: requests that arrive together start together.
        with batcher.arriving():
            # The prompt's tokens and the sequence's state (a grammar's first mask included) are
            # CPU work: made off the event loop.
            seq = await asyncio.to_thread(_sequence, model.generator, prompt, params)
            self._admit(batcher.width)
            channel = GenerationChannel()
            try:
                batcher.submit(seq, channel, self._release)
            except BaseException:
                self._release()
                raise
        return model, channel


def _sequence(generator: TextGenerator, prompt: Prompt, params: GenerationParams) -> Sequence:
    return generator.sequence(generator.check_prompt(prompt, params), params)


async def _closing(channel: GenerationChannel) -> AsyncIterator[StreamItem]:
    """The channel's items; however the reader stops (cancelled included), generation stops."""
    try:
        async for item in channel.items():
            yield item
    finally:
        channel.cancelled.set()
