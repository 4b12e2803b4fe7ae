"""An exported decoder-with-past ONNX graph, driven by input name (fused and generic exports).

Two KV-cache disciplines, named by the manifest's ``io.kv_cache``:

* ``concat`` (optimum exports): each step feeds the previous ``present`` tensors back as ``past``.
* ``shared`` (our fused graphs: Llama, Mistral, Qwen2, Qwen3, GLM, GLM-4): one preallocated buffer per layer is bound through
  IO binding as both ``past`` input and ``present`` output; GroupQueryAttention writes the new
  positions in place. The buffers, the step inputs and the decode logits are allocated once and
  reused, so a decode step allocates nothing but the small logits view handed to the sampler.

Prefix cache: the KV of the last sequence stays where it was computed (the shared buffers, or the
last ``present`` tensors), with the token ids it holds. A new sequence that begins with the same
tokens — the next turn of a chat, a fixed agent system prompt — starts after them and prefills only
the rest, as llama.cpp's server does per slot (``cache_prompt``). It costs no memory beyond what
decoding already holds, and one entry: alternating conversations reuse only what they share.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from shared.errors import ContextTooLong, ModelLoadError
from shared.manifest import IOSignature

log = logging.getLogger(__name__)

_PROVIDER_ORDER = ("CUDAExecutionProvider", "CPUExecutionProvider")
_NP_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
# Shared KV buffers grow in steps of this many positions (capped at the context length).
_KV_GRANULE = 256


def choose_providers(preferred: list[str] | None = None) -> list[str]:
    """CUDA first when this onnxruntime build and device have it, CPU always last."""
    available = set(ort.get_available_providers())
    wanted = preferred or list(_PROVIDER_ORDER)
    chosen = [p for p in wanted if p in available]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


class Decoder(Protocol):
    """One sequence being decoded: feed tokens, get the logits of every fed position."""

    # Positions already in the cache: reused from the previous sequence before the first step.
    past_len: int

    def step(self, token_ids: list[int], last_only: bool = False) -> np.ndarray:
        """Logits [len(token_ids), vocab] for ``token_ids`` appended after ``past_len`` positions
        (with ``last_only``, where the graph can: [1, vocab], the last position's).

        The array may be reused by the next step: consume it before stepping again."""
        ...


class OnnxCausalLM:
    """One ONNX Runtime session plus the naming of its KV-cache tensors."""

    def __init__(
        self,
        graph: Path,
        io: IOSignature,
        *,
        threads: int = 0,
        providers: list[str] | None = None,
    ) -> None:
        self.io = io
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(graph), opts, providers=choose_providers(providers))
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ModelLoadError(f"onnxruntime could not load the graph: {exc}", path=str(graph)) from exc
        self.providers = self.session.get_providers()
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.input_names = set(inputs)
        # Fused graphs packaged since 2026-12-03 take the number of last positions to compute
        # logits for (0: all); older packages compute them all.
        self.trims_logits = "logits_to_keep" in self.input_names
        if "input_ids" not in inputs:
            raise ModelLoadError("graph has no input_ids input", path=str(graph))
        self.past_names = [
            (f"past_key_values.{i}.key", f"past_key_values.{i}.value") for i in range(io.num_layers)
        ]
        self.present_names = [(f"present.{i}.key", f"present.{i}.value") for i in range(io.num_layers)]
        missing = [n for pair in self.past_names for n in pair if n not in inputs]
        if missing:
            raise ModelLoadError(f"graph lacks KV-cache inputs {missing[:2]}...", path=str(graph))
        self.kv_dtype = _NP_DTYPES.get(inputs[self.past_names[0][0]].type, np.float32)
        self.output_names = ["logits"] + [n for pair in self.present_names for n in pair]
        self.shared_kv = io.kv_cache == "shared"
        if self.shared_kv and not {"seqlens_k", "total_sequence_length"} <= self.input_names:
            raise ModelLoadError(
                "manifest says kv_cache=shared but the graph lacks seqlens_k", path=str(graph)
            )
        self._buffers: _SharedBuffers | None = None
        self._concat_cache = _PrefixCache()
        # Off: every sequence is prefilled from scratch (benchmarks of cold prefill).
        self.prefix_cache = True

    def decoder(self, capacity: int, prompt_ids: Sequence[int] = ()) -> Decoder:
        """A decoder for one sequence of at most ``capacity`` positions (prompt + new tokens).

        With ``prompt_ids``, the cached positions the previous sequence shares with it are kept:
        the decoder's ``past_len`` says how many, and only ``prompt_ids[past_len:]`` is fed."""
        if capacity > self.io.context_length:
            raise ContextTooLong(f"{capacity} positions exceed the local context of {self.io.context_length}")
        if not self.prefix_cache:
            prompt_ids = ()
        if not self.shared_kv:
            keep = self._concat_cache.reusable(prompt_ids)
            return _ConcatDecoder(self, self._concat_cache, keep)
        if self._buffers is None or self._buffers.capacity < capacity:
            size = min(self.io.context_length, -(-capacity // _KV_GRANULE) * _KV_GRANULE)
            self._buffers = _SharedBuffers(self, size)
        return self._buffers.start(prompt_ids)

    def sequence_logits(self, input_ids: list[int]) -> np.ndarray:
        """Logits [len, vocab] for every position of a full sequence, from an empty cache."""
        return self.decoder(len(input_ids)).step(input_ids)


class _PrefixCache:
    """The token ids whose KV the cache holds, position by position (and, for concatenated
    caches, the tensors themselves)."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.past: dict[str, np.ndarray] = {}

    def reusable(self, prompt_ids: Sequence[int]) -> int:
        """How many leading positions a sequence starting with ``prompt_ids`` can keep: the
        common prefix, less one when it is the whole prompt (a step needs a token to feed)."""
        n = 0
        for cached, wanted in zip(self.tokens, prompt_ids, strict=False):
            if cached != wanted:
                break
            n += 1
        return min(n, max(len(prompt_ids) - 1, 0))

    def keep(self, n: int) -> None:
        del self.tokens[n:]


class _ConcatDecoder:
    def __init__(self, model: OnnxCausalLM, cache: _PrefixCache, keep: int) -> None:
        self.model = model
        self.cache = cache
        self.past_len = keep if cache.past else 0
        if self.past_len:
            self.past = {name: t[:, :, : self.past_len, :] for name, t in cache.past.items()}
        else:
            shape = (1, model.io.num_kv_heads, 0, model.io.head_dim)
            empty = np.zeros(shape, dtype=model.kv_dtype)
            self.past = {name: empty for pair in model.past_names for name in pair}
        cache.keep(self.past_len)

    def step(self, token_ids: list[int], last_only: bool = False) -> np.ndarray:
        m = self.model
        seq = len(token_ids)
        feeds: dict[str, np.ndarray] = {"input_ids": np.asarray([token_ids], dtype=np.int64)}
        if "attention_mask" in m.input_names:
            feeds["attention_mask"] = np.ones((1, self.past_len + seq), dtype=np.int64)
        if "position_ids" in m.input_names:
            feeds["position_ids"] = np.arange(self.past_len, self.past_len + seq, dtype=np.int64)[None, :]
        feeds.update(self.past)
        self.cache.keep(self.past_len)  # what it held from here on is about to be replaced
        try:
            outputs = m.session.run(m.output_names, feeds)
        except BaseException:
            self.cache.keep(0)
            raise
        for (pk, pv), k, v in zip(m.past_names, outputs[1::2], outputs[2::2], strict=True):
            self.past[pk] = k
            self.past[pv] = v
        self.past_len += seq
        self.cache.tokens.extend(token_ids)
        self.cache.past = self.past
        logits: np.ndarray = outputs[0][0]
        return logits


class _SharedBuffers:
    """KV buffers, step inputs and decode logits for the shared-KV graph, allocated once."""

    def __init__(self, model: OnnxCausalLM, capacity: int) -> None:
        self.model = model
        self.capacity = capacity
        io = model.io
        shape = (1, io.num_kv_heads, capacity, io.head_dim)
        self.binding = model.session.io_binding()
        self.logits = np.zeros((1, 1, io.vocab_size), dtype=np.float32)
        self._logits_value = ort.OrtValue.ortvalue_from_numpy(self.logits)
        # Bound first, so the prefill's freshly allocated logits are get_outputs()[0].
        self.binding.bind_ortvalue_output("logits", self._logits_value)
        # The cache lives where the attention runs. On CUDA a host buffer would be copied to the
        # device and back on every step, and past and present would no longer be one buffer.
        # (Not verified on a GPU yet: no GPU machine was lent to the sessions that wrote this.)
        on_cuda = model.providers[0] == "CUDAExecutionProvider"
        # Keep numpy arrays alive: on the CPU the OrtValues below wrap their memory without copying.
        self._arrays: list[np.ndarray] = []
        for pair_in, pair_out in zip(model.past_names, model.present_names, strict=True):
            for name_in, name_out in zip(pair_in, pair_out, strict=True):
                arr = np.zeros(shape, dtype=model.kv_dtype)
                if on_cuda:
                    value = ort.OrtValue.ortvalue_from_numpy(arr, "cuda", 0)
                else:
                    self._arrays.append(arr)
                    value = ort.OrtValue.ortvalue_from_numpy(arr)
                self.binding.bind_ortvalue_input(name_in, value)
                self.binding.bind_ortvalue_output(name_out, value)
        self.token = np.zeros((1, 1), dtype=np.int64)
        self.seqlens = np.zeros((1,), dtype=np.int32)
        self.total = np.zeros((), dtype=np.int32)
        self.cache = _PrefixCache()
        self.keep_last = np.ones(1, dtype=np.int64)
        self.keep_all = np.zeros(1, dtype=np.int64)
        if model.trims_logits:
            self.binding.bind_cpu_input("logits_to_keep", self.keep_all)
        self._token_value = ort.OrtValue.ortvalue_from_numpy(self.token)
        self.binding.bind_ortvalue_input("seqlens_k", ort.OrtValue.ortvalue_from_numpy(self.seqlens))
        self.binding.bind_ortvalue_input(
            "total_sequence_length", ort.OrtValue.ortvalue_from_numpy(self.total)
        )

    def start(self, prompt_ids: Sequence[int] = ()) -> _SharedDecoder:
        keep = self.cache.reusable(prompt_ids)
        self.cache.keep(keep)
        return _SharedDecoder(self, keep)


class _SharedDecoder:
    def __init__(self, buffers: _SharedBuffers, past_len: int = 0) -> None:
        self.b = buffers
        self.past_len = past_len

    def step(self, token_ids: list[int], last_only: bool = False) -> np.ndarray:
        b = self.b
        seq = len(token_ids)
        total = self.past_len + seq
        if total > b.capacity:
            raise ContextTooLong(f"sequence of {total} positions exceeds the KV buffer of {b.capacity}")
        # Positions from past_len on are about to be written: what the cache said of them is over.
        b.cache.keep(self.past_len)
        b.seqlens[0] = total - 1
        b.total[()] = total
        try:
            if seq == 1:
                # The hot path: every tensor is preallocated and already bound.
                b.token[0, 0] = token_ids[0]
                b.binding.bind_ortvalue_input("input_ids", b._token_value)
                b.binding.bind_ortvalue_output("logits", b._logits_value)
                b.model.session.run_with_iobinding(b.binding)
                logits: np.ndarray = b.logits[0]
            else:
                b.binding.bind_cpu_input("input_ids", np.asarray([token_ids], dtype=np.int64))
                if b.model.trims_logits:
                    b.binding.bind_cpu_input("logits_to_keep", b.keep_last if last_only else b.keep_all)
                b.binding.bind_output("logits")
                b.model.session.run_with_iobinding(b.binding)
                logits = b.binding.get_outputs()[0].numpy()[0]
        except BaseException:
            b.cache.keep(0)  # a failed step may have written some positions
            raise
        b.cache.tokens.extend(token_ids)
        self.past_len = total
        return logits


def perplexity(model: OnnxCausalLM, token_ids: list[int], window: int) -> tuple[float, int]:
    """Perplexity over non-overlapping windows; returns (perplexity, tokens scored)."""
    nll = 0.0
    scored = 0
    for start in range(0, len(token_ids) - 1, window):
        chunk = token_ids[start : start + window + 1]
        if len(chunk) < 2:
            break
        logits = model.sequence_logits(chunk[:-1]).astype(np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        logprobs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        targets = np.asarray(chunk[1:])
        nll -= float(logprobs[np.arange(len(targets)), targets].sum())
        scored += len(targets)
    if scored == 0:
        raise ValueError("need at least two tokens to measure perplexity")
    return float(np.exp(nll / scored)), scored
