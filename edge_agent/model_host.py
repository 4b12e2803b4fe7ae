"""The model being served: loaded from a slot, swapped atomically, called off the event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from edge_agent.runtime.generator import GenerationParams, GenerationResult, TextGenerator
from edge_agent.runtime.sampling import SamplingConfig
from edge_agent.runtime.session import OnnxCausalLM
from edge_agent.settings import RuntimeSettings
from shared.errors import InferenceError, ModelLoadError
from shared.manifest import Manifest


@dataclass
class LoadedModel:
    manifest: Manifest
    slot: str
    generator: TextGenerator

    @property
    def model_id(self) -> str:
        return f"{self.manifest.name}:{self.manifest.version}"

    @classmethod
    def load(cls, folder: Path, manifest: Manifest, slot: str, runtime: RuntimeSettings) -> LoadedModel:
        graph = next((f.path for f in manifest.files if f.role == "graph"), None)
        if graph is None:
            raise ModelLoadError("manifest lists no graph file", name=manifest.name, version=manifest.version)
        session = OnnxCausalLM(
            folder / graph, manifest.io, threads=runtime.threads, providers=runtime.providers
        )
        try:
            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:
            raise ModelLoadError(f"tokenizer.json cannot be loaded: {exc}", slot=slot) from exc
        return cls(manifest, slot, TextGenerator(session, tokenizer))

    def smoke_test(self) -> None:
        """One greedy token through the whole path; anything wrong raises ModelLoadError."""
        try:
            self.generator.generate(
                "Hello", GenerationParams(max_tokens=2, sampling=SamplingConfig(temperature=0.0))
            )
        except Exception as exc:
            raise ModelLoadError(f"smoke test failed: {exc}", model=self.model_id) from exc


class ModelHost:
    """Holds the active model; one generation runs at a time (issue #3 brings batching)."""

    def __init__(self) -> None:
        self._current: LoadedModel | None = None
        self._lock = threading.Lock()

    @property
    def current(self) -> LoadedModel | None:
        return self._current

    def swap(self, model: LoadedModel | None) -> LoadedModel | None:
        old, self._current = self._current, model
        return old

    def _require(self) -> LoadedModel:
        model = self._current
        if model is None:
            raise InferenceError("no model is active on this device yet", status=503, code="model_not_ready")
        return model

    async def generate(self, prompt: str, params: GenerationParams) -> tuple[LoadedModel, GenerationResult]:
        model = self._require()

        def run() -> GenerationResult:
            with self._lock:
                return model.generator.generate(prompt, params)

        return model, await asyncio.to_thread(run)

    async def stream(
        self, prompt: str, params: GenerationParams
    ) -> tuple[LoadedModel, AsyncIterator[str | GenerationResult]]:
        model = self._require()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | GenerationResult | BaseException] = asyncio.Queue()

        def run() -> None:
            try:
                with self._lock:
                    for item in model.generator.stream(prompt, params):
                        loop.call_soon_threadsafe(queue.put_nowait, item)
            except BaseException as exc:
                loop.call_soon_threadsafe(queue.put_nowait, exc)

        # Validate the prompt (length, emptiness) before the response starts streaming.
        model.generator.check_prompt(prompt)
        worker = asyncio.create_task(asyncio.to_thread(run), name="generation-stream")

        async def items() -> AsyncIterator[str | GenerationResult]:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if isinstance(item, GenerationResult):
                    await worker
                    return

        return model, items()
