"""The model being served: loaded from a slot, swapped atomically, called off the event loop.

One generation runs at a time (batch-1 decode is bound by reading the weights; a second
concurrent sequence on two CPU cores would only halve both). Up to ``queue_size`` more requests
wait their turn in arrival order; beyond that a request is refused at once with 429 and a
Retry-After estimated from recent request durations, so clients back off instead of piling up.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from edge_agent.runtime.channel import GenerationChannel
from edge_agent.runtime.chat import ChatTemplate
from edge_agent.runtime.generator import GenerationParams, GenerationResult, StreamItem, TextGenerator
from edge_agent.runtime.sampling import SamplingConfig
from edge_agent.runtime.session import OnnxCausalLM
from edge_agent.runtime.text import Prompt
from shared.errors import ModelLoadError, ModelNotReady, QueueFull
from shared.manifest import Manifest


@dataclass
class LoadedModel:
    manifest: Manifest
    slot: str
    generator: TextGenerator
    chat: ChatTemplate
    threads: int = 0

    @property
    def model_id(self) -> str:
        return f"{self.manifest.name}:{self.manifest.version}"

    @property
    def names(self) -> frozenset[str]:
        return frozenset({self.model_id, self.manifest.name})

    @classmethod
    def load(
        cls, folder: Path, manifest: Manifest, slot: str, *, threads: int, providers: list[str] | None
    ) -> LoadedModel:
        graph = next((f.path for f in manifest.files if f.role == "graph"), None)
        if graph is None:
            raise ModelLoadError("manifest lists no graph file", name=manifest.name, version=manifest.version)
        session = OnnxCausalLM(folder / graph, manifest.io, threads=threads, providers=providers)
        try:
            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:
            raise ModelLoadError(f"tokenizer.json cannot be loaded: {exc}", slot=slot) from exc
        chat = ChatTemplate.from_folder(folder)
        return cls(manifest, slot, TextGenerator(session, tokenizer), chat, threads)

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
    def __init__(self, queue_size: int = 16) -> None:
        self._current: LoadedModel | None = None
        self.queue_size = queue_size
        self._admitted = 0  # generating + waiting
        self._turn = asyncio.Lock()
        self._run_lock = threading.Lock()
        self.stats = HostStats()

    @property
    def current(self) -> LoadedModel | None:
        return self._current

    @property
    def waiting(self) -> int:
        return max(0, self._admitted - 1)

    def swap(self, model: LoadedModel | None) -> LoadedModel | None:
        old, self._current = self._current, model
        return old

    def require(self) -> LoadedModel:
        model = self._current
        if model is None:
            raise ModelNotReady("no model is active on this device yet", retry_after_s=5)
        return model

    def _admit(self) -> None:
        if self._admitted >= 1 + self.queue_size:
            self.stats.rejected_queue_full += 1
            wait = self.stats.avg_request_s * (self.waiting + 1)
            raise QueueFull(
                f"the local queue is full ({self.queue_size} waiting); retry later",
                retry_after_s=max(1, math.ceil(wait)),
            )
        self._admitted += 1

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        """Admission (or 429) now, then the turn to generate, in arrival order."""
        self._admit()
        try:
            async with self._turn:
                yield
        finally:
            self._admitted -= 1

    def _record(self, result: GenerationResult, seconds: float, decode_s: float) -> None:
        s = self.stats
        s.requests_done += 1
        s.prompt_tokens += result.prompt_tokens
        s.completion_tokens += result.completion_tokens
        s.busy_s += seconds
        s.avg_request_s = 0.8 * s.avg_request_s + 0.2 * seconds
        if result.completion_tokens > 1 and decode_s > 0:
            s.last_decode_tok_s = (result.completion_tokens - 1) / decode_s

    def _timed(self, items: Iterator[StreamItem]) -> Iterator[StreamItem]:
        """Pass the items through, recording timing when the result arrives."""
        start = time.perf_counter()
        first: float | None = None
        for item in items:
            if isinstance(item, GenerationResult):
                end = time.perf_counter()
                self._record(item, end - start, end - first if first is not None else 0.0)
            elif first is None:
                first = time.perf_counter()
            yield item

    async def generate(
        self, prompt: Prompt, params: GenerationParams
    ) -> tuple[LoadedModel, GenerationResult]:
        model = self.require()
        prompt_ids = await asyncio.to_thread(model.generator.check_prompt, prompt, params)

        # Set when the caller is cancelled (its client went away): the thread stops at the next
        # token and the runtime is free for the next request.
        cancelled = threading.Event()

        def run() -> GenerationResult | None:
            with self._run_lock:
                for item in self._timed(model.generator.stream_ids(prompt_ids, params)):
                    if cancelled.is_set():
                        return None
                    if isinstance(item, GenerationResult):
                        return item
            raise AssertionError("stream ended without a result")  # pragma: no cover

        try:
            async with self._slot():
                result = await asyncio.to_thread(run)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        assert result is not None
        return model, result

    async def stream(
        self, prompt: Prompt, params: GenerationParams
    ) -> tuple[LoadedModel, AsyncIterator[StreamItem]]:
        """Validate and admit now (errors before the response starts), generate in the background."""
        model = self.require()
        prompt_ids = await asyncio.to_thread(model.generator.check_prompt, prompt, params)
        self._admit()
        channel = GenerationChannel()

        def run() -> None:
            try:
                with self._run_lock:
                    for item in self._timed(model.generator.stream_ids(prompt_ids, params)):
                        channel.put(item)
                        if channel.cancelled.is_set():
                            return  # the client went away; free the runtime for the next request
            except BaseException as exc:
                channel.put(exc)

        async def work() -> None:
            try:
                async with self._turn:
                    await asyncio.to_thread(run)
            finally:
                self._admitted -= 1

        worker = asyncio.create_task(work(), name="generation-stream")
        return model, channel.items(finished=worker)
