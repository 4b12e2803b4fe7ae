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


def _options(threads: int, library: Path | None) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if library is not None:
        opts.register_custom_ops_library(str(library))
    return opts


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
        custom_ops: Path | None = None,
    ) -> None:
        self.io = io
        chosen = choose_providers(providers)
        # A custom-op library (edge_agent.runtime.kernels: CPU kernels for MatMulNBits and
        # GroupQueryAttention) is tried
        # first on a CPU-only session; where session creation refuses it (another CPU, a graph it
        # does not take), the graph runs on onnxruntime's own kernels.
        self.custom_ops_loaded = False
        if custom_ops is not None and chosen[0] == "CPUExecutionProvider":
            try:
                self.session = ort.InferenceSession(
                    str(graph), _options(threads, custom_ops), providers=chosen
                )
                self.custom_ops_loaded = True
                log.info("%s runs with the kernels of %s", graph, custom_ops)
            except Exception as exc:  # onnxruntime raises its own untyped errors
                log.warning("custom ops %s not used for %s: %s", custom_ops, graph, exc)
        if not self.custom_ops_loaded:
            try:
                self.session = ort.InferenceSession(str(graph), _options(threads, None), providers=chosen)
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

    @property
    def rows_independent(self) -> bool:
        """Whether a sequence's logits are the same whatever decodes beside it: with the edge's
        own kernels (edge_agent.runtime.kernels) every row gets the same instructions
        at any batch width; onnxruntime's compute a lone row differently (:meth:`step_together`)."""
        return self.custom_ops_loaded

    @property
    def batches(self) -> bool:
        """Whether several sequences can decode in one step (shared KV on host memory)."""
        return self.shared_kv and self.providers[0] != "CUDAExecutionProvider"

    def decoder(
        self,
        capacity: int,
        prompt_ids: Sequence[int] = (),
        *,
        busy: frozenset[int] = frozenset(),
        rows: int = 1,
        invariant: bool = False,
    ) -> Decoder:
        """A decoder for one sequence of at most ``capacity`` positions (prompt + new tokens).

        With ``prompt_ids``, the cached positions a previous sequence shares with it are kept:
        the decoder's ``past_len`` says how many, and only ``prompt_ids[past_len:]`` is fed.

        The parallel-slots scheduler passes the KV rows its running sequences hold (``busy``) and
        how many rows it may use (``rows``); the decoder gets a free row, the one whose cache
        fits the prompt best. Buffers grow (keeping their contents) to fit (``invariant``: to an
        even number of rows, see :meth:`step_together`)."""
        if capacity > self.io.context_length:
            raise ContextTooLong(f"{capacity} positions exceed the local context of {self.io.context_length}")
        if not self.prefix_cache:
            prompt_ids = ()
        if not self.shared_kv:
            keep = self._concat_cache.reusable(prompt_ids)
            return _ConcatDecoder(self, self._concat_cache, keep)
        b = self._buffers
        chosen = b.choose_row(prompt_ids, busy, can_grow=b.rows < rows) if b is not None else None
        if chosen is not None:
            row = chosen
        else:
            # Every row is taken, or every free one holds another prompt's cache that this one
            # would overwrite for little: one more row (the scheduler admits no more than ``rows``).
            row = b.rows if b is not None else 0
            if row >= rows:
                raise RuntimeError(f"all {rows} KV rows are taken")
        want = max(2, row + 1 + (row + 1) % 2) if invariant and self.batches else row + 1
        if b is None or b.capacity < capacity or b.rows < want:
            size = min(self.io.context_length, -(-capacity // _KV_GRANULE) * _KV_GRANULE)
            size = max(size, b.capacity if b is not None else 0)
            self._buffers = b = _SharedBuffers(self, size, max(want, b.rows if b else 1), old=b)
        return b.start(row, prompt_ids)

    def step_together(
        self, decoders: Sequence[Decoder], tokens: Sequence[int], invariant: bool = False
    ) -> np.ndarray:
        """One decode step for several sequences (one new token each): logits [n, vocab], which
        the next step may overwrite (consume them before stepping again).

        Shared-KV decoders on host memory run as one batch; others (concatenated caches, a CUDA
        cache, whose rows cannot be sliced into one binding) one after another.

        ``invariant``: the batch has an even number of rows (idle rows ride along). ONNX Runtime's
        MatMulNBits computes rows in pairs and an odd last row with a one-row kernel that rounds
        differently (as accurate, not the same), so a sequence's logits would depend on how many
        others share its step; with even widths they never do."""
        shared = [d for d in decoders if isinstance(d, _SharedDecoder)]
        if self.batches and shared and len(shared) == len(decoders) and self._buffers is not None:
            return self._buffers.step_rows(shared, tokens, invariant)
        return np.stack([d.step([t])[-1] for d, t in zip(decoders, tokens, strict=True)])

    def prefill_together(self, decoders: Sequence[Decoder], pieces: Sequence[list[int]]) -> np.ndarray | None:
        """Several sequences' next prompt pieces read in one run: each one's last position's
        logits [n, vocab], in order; None where they cannot share a run (the caller reads them
        one by one), see :meth:`_SharedBuffers.prefill_rows`.

        Only on the edge's own kernels: their attention takes several rows continuing caches of
        different lengths (onnxruntime's takes one sequence), and every row is computed alike
        whatever its company, so each sequence's logits are those of reading its piece alone.
        Only where the graph trims its logits (``logits_to_keep``): otherwise every padded
        position would run through the vocabulary projection."""
        shared = [d for d in decoders if isinstance(d, _SharedDecoder)]
        if not (self.batches and self.rows_independent and self.trims_logits) or self._buffers is None:
            return None
        if len(shared) != len(decoders) or len(decoders) < 2:
            return None
        return self._buffers.prefill_rows(shared, pieces)

    def sequence_logits(self, input_ids: list[int]) -> np.ndarray:
        """Logits [len, vocab] for every position of a full sequence, from an empty cache."""
        return self.decoder(len(input_ids)).step(input_ids)


class _PrefixCache:
    """The token ids whose KV the cache holds, position by position (and, for concatenated
    caches, the tensors themselves)."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.past: dict[str, np.ndarray] = {}
        # When a sequence last started on it (its buffers' count of starts): the least recently
        # used cache is the one given up when every choice loses one.
        self.last_used = 0

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
    """KV buffers for ``rows`` sequences of the shared-KV graph, one [rows, heads, capacity,
    head_dim] array per tensor, with each row's step inputs and prefix cache, allocated once.

    A row is prefilled and stepped on its own through a binding of its slice of the buffers; the
    parallel-slots scheduler also decodes several rows in one run (:meth:`step_rows`), which reads
    the weights once for all of them. GroupQueryAttention takes each row's own length
    (``seqlens_k``), so rows at different positions share a step."""

    def __init__(
        self, model: OnnxCausalLM, capacity: int, rows: int = 1, old: _SharedBuffers | None = None
    ) -> None:
        self.model = model
        self.capacity = capacity
        self.rows = rows
        io = model.io
        shape = (rows, io.num_kv_heads, capacity, io.head_dim)
        # The cache lives where the attention runs. On CUDA a host buffer would be copied to the
        # device and back on every step, and past and present would no longer be one buffer.
        # (Not verified on a GPU yet: no GPU machine was lent to the sessions that wrote this.)
        self.on_cuda = model.providers[0] == "CUDAExecutionProvider"
        if self.on_cuda and rows != 1:
            raise ValueError("parallel rows need host KV buffers (CPU execution provider)")
        self.arrays: list[np.ndarray] = [
            np.zeros(shape, dtype=model.kv_dtype) for _ in range(2 * io.num_layers)
        ]
        if old is not None and not self.on_cuda:
            # Growing: the rows' caches (and any sequence being decoded) keep their positions.
            for new_arr, old_arr in zip(self.arrays, old.arrays, strict=True):
                new_arr[: old.rows, :, : old.capacity] = old_arr
        self.by_row: list[_RowBinding] = [
            _RowBinding(
                self,
                r,
                old.by_row[r].cache
                if old is not None and r < old.rows and not self.on_cuda
                else _PrefixCache(),
            )
            for r in range(rows)
        ]
        # Bindings of the spans stepped so far, keyed by (first row, width): up to rows x (rows + 1)
        # / 2 of them, so their logits share one array (each span's are its leading rows).
        self._steps: dict[tuple[int, int], _BatchBinding] = {}
        self._step_logits: np.ndarray | None = None
        self._starts: int = old._starts if old is not None else 0
        # Bindings of adjacent rows (first row, how many) for prompt pieces read together.
        self._prefills: dict[tuple[int, int], ort.IOBinding] = {}

    def values(self, lo: int, hi: int) -> list[ort.OrtValue]:
        """OrtValues over rows [lo, hi) of every KV array, in (past, present) name order."""
        if self.on_cuda:
            return [ort.OrtValue.ortvalue_from_numpy(arr, "cuda", 0) for arr in self.arrays]
        # A leading-axis slice of a C-contiguous array is contiguous: the OrtValue wraps it in place.
        return [ort.OrtValue.ortvalue_from_numpy(arr[lo:hi]) for arr in self.arrays]

    def bind_kv(self, binding: ort.IOBinding, values: list[ort.OrtValue]) -> None:
        names = zip(self.model.past_names, self.model.present_names, strict=True)
        flat = [(i, o) for pair_in, pair_out in names for i, o in zip(pair_in, pair_out, strict=True)]
        for (name_in, name_out), value in zip(flat, values, strict=True):
            binding.bind_ortvalue_input(name_in, value)
            binding.bind_ortvalue_output(name_out, value)

    def choose_row(
        self, prompt_ids: Sequence[int], busy: frozenset[int], *, can_grow: bool = False
    ) -> int | None:
        """The free row for a sequence starting with ``prompt_ids``; None for a new row (when
        every row is busy, or ``can_grow`` and each free row holds a cache worth keeping).

        Taking a row keeps the prefix its cache shares with the prompt and overwrites the rest.
        A row worth taking keeps at least a quarter of what it overwrites: the next turn of its
        conversation, or the same long system prompt after another question and answer (what is
        kept is prefill saved now, what is overwritten only maybe wanted later); of those, the
        one that keeps most (the lowest on a tie, so that batched steps stay narrow). Otherwise
        the prompt would overwrite another conversation for a few shared tokens (a chat
        template's opening, a default system prompt): it goes to an empty row or a new one, so
        that two apps taking turns each keep their cache. When there is neither, some cache is
        overwritten anyway: the one sharing most with the prompt, the least recently used on a tie
        (requests that arrive together then each still find the row of their earlier turn, which
        taking the least recently used one outright could hand to another of them)."""
        free = [r for r in range(self.rows) if r not in busy]
        if not free:
            return None
        if not prompt_ids:  # nothing to match (the prefix cache is off)
            return free[0]
        kept = {r: self.by_row[r].cache.reusable(prompt_ids) for r in free}
        lost = {r: len(self.by_row[r].cache.tokens) - kept[r] for r in free}
        worth = [r for r in free if kept[r] > 0 and 4 * kept[r] >= lost[r]]
        if worth:
            return max(worth, key=lambda r: (kept[r], -r))
        empty = [r for r in free if not self.by_row[r].cache.tokens]
        if empty:
            return empty[0]
        if can_grow:
            return None
        return max(free, key=lambda r: (kept[r], -self.by_row[r].cache.last_used, -r))

    def start(self, row: int, prompt_ids: Sequence[int] = ()) -> _SharedDecoder:
        cache = self.by_row[row].cache
        keep = cache.reusable(prompt_ids)
        cache.keep(keep)
        self._starts += 1
        cache.last_used = self._starts
        return _SharedDecoder(self.model, row, keep)

    def step_rows(
        self, decoders: Sequence[_SharedDecoder], tokens: Sequence[int], invariant: bool = False
    ) -> np.ndarray:
        """One decode step for several rows at once: logits [len(decoders), vocab], in order.

        Rows between them that are not decoding ride along on a dummy token; what it writes lands
        just past their cached prefix, which nothing reads."""
        lo, width = self._span(decoders, invariant)
        step = self._steps.get((lo, width))
        if step is None:
            step = self._steps[(lo, width)] = _BatchBinding(self, lo, width, self._step_logits_rows(width))
        for r in range(width):
            cache = self.by_row[lo + r].cache
            if len(cache.tokens) >= self.capacity:
                cache.keep(self.capacity - 1)
            step.seqlens[r] = len(cache.tokens)
            step.ids[r, 0] = 0
        for d, token in zip(decoders, tokens, strict=True):
            if d.past_len + 1 > self.capacity:
                raise ContextTooLong(f"sequence exceeds the KV buffer of {self.capacity}")
            self.by_row[d.row].cache.keep(d.past_len)
            step.seqlens[d.row - lo] = d.past_len
            step.ids[d.row - lo, 0] = token
        step.total[()] = int(step.seqlens.max()) + 1
        try:
            self.model.session.run_with_iobinding(step.binding)
        except BaseException:
            for d in decoders:
                self.by_row[d.row].cache.keep(0)
            raise
        for d, token in zip(decoders, tokens, strict=True):
            self.by_row[d.row].cache.tokens.append(token)
            d.past_len += 1
        rows = [d.row - lo for d in decoders]
        if rows == list(range(width)):
            # The binding's own array, not a copy of it (786 KB a step for 4 rows of SmolLM2's
            # vocabulary): the caller samples from it before the next step.
            return step.logits[:, 0]
        return step.logits[rows, 0]

    def prefill_rows(
        self, decoders: Sequence[_SharedDecoder], pieces: Sequence[list[int]]
    ) -> np.ndarray | None:
        """The decoders' next prompt pieces in one run over their rows, which must be adjacent:
        logits [len(decoders), vocab] of each piece's last position; None where the rows are not
        adjacent or a row has no room for the padding. (A one-token piece among longer ones runs
        the attention's prompt routine where alone it would run the decode-step one: the edge's
        kernels sum both alike, bit for bit, group_query_attention.c.)

        Every row is fed as many positions as the longest piece: a shorter one is padded at its
        end with token 0, whose keys land past that row's cached prefix (its cache does not list
        them, and the row's next positions overwrite them) and which no earlier position attends
        to. The run keeps the logits of the last positions from the shortest piece's last one on
        (``logits_to_keep``) and each row takes its own."""
        order = sorted(range(len(decoders)), key=lambda i: decoders[i].row)
        lo = decoders[order[0]].row
        if [decoders[i].row for i in order] != list(range(lo, lo + len(order))):
            return None
        longest = max(len(p) for p in pieces)
        if any(d.past_len + longest > self.capacity for d in decoders):
            return None
        kept = longest - min(len(p) for p in pieces) + 1
        binding = self._prefills.get((lo, len(order)))
        if binding is None:
            binding = self._prefills[(lo, len(order))] = self.model.session.io_binding()
            binding.bind_output("logits")  # first: get_outputs()[0]
            self.bind_kv(binding, self.values(lo, lo + len(order)))
        ids = np.zeros((len(order), longest), dtype=np.int64)
        seqlens = np.empty(len(order), dtype=np.int32)
        for j, i in enumerate(order):
            d = decoders[i]
            ids[j, : len(pieces[i])] = pieces[i]
            seqlens[j] = d.past_len + longest - 1
            # Positions from past_len on are about to be written: what the cache said of them is over.
            self.by_row[d.row].cache.keep(d.past_len)
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("seqlens_k", seqlens)
        binding.bind_cpu_input("total_sequence_length", np.asarray(int(seqlens.max()) + 1, dtype=np.int32))
        binding.bind_cpu_input("logits_to_keep", np.asarray([kept], dtype=np.int64))
        try:
            self.model.session.run_with_iobinding(binding)
        except BaseException:
            for d in decoders:
                self.by_row[d.row].cache.keep(0)  # a failed run may have written some positions
            raise
        logits = binding.get_outputs()[0].numpy()  # [rows, kept, vocab]
        binding.bind_output("logits")  # the binding lets go of this run's (kept x vocab per row)
        out = np.empty((len(decoders), logits.shape[-1]), dtype=logits.dtype)
        for j, i in enumerate(order):
            d, piece = decoders[i], pieces[i]
            out[i] = logits[j, len(piece) - 1 - (longest - kept)]
            self.by_row[d.row].cache.tokens.extend(piece)
            d.past_len += len(piece)
        return out

    def _step_logits_rows(self, width: int) -> np.ndarray:
        """The first ``width`` rows of the logits array every step binding writes into (a leading
        slice of a C-contiguous array is contiguous: ONNX Runtime writes it in place)."""
        if self._step_logits is None:
            self._step_logits = np.zeros((self.rows, 1, self.model.io.vocab_size), dtype=np.float32)
        return self._step_logits[:width]

    def _span(self, decoders: Sequence[_SharedDecoder], invariant: bool) -> tuple[int, int]:
        """The rows a batched step binds, [lo, lo + width): the lowest decoding row to the highest,
        so that a sequence alone steps alone on whichever row it holds (the rows it takes move
        with the prompts it serves, :meth:`choose_row`). ``invariant``: an even count (as many as
        the buffers hold at most), moved down where it would run past the last row."""
        lo, hi = min(d.row for d in decoders), max(d.row for d in decoders) + 1
        if not invariant:
            return lo, hi - lo
        width = min(self.rows, hi - lo + (hi - lo) % 2)
        return max(0, min(lo, self.rows - width)), width


class _RowBinding:
    """One row's slice of the KV buffers bound for stepping that sequence alone."""

    def __init__(self, buffers: _SharedBuffers, row: int, cache: _PrefixCache) -> None:
        model = buffers.model
        self.cache = cache
        self.binding = model.session.io_binding()
        self.logits = np.zeros((1, 1, model.io.vocab_size), dtype=np.float32)
        self._logits_value = ort.OrtValue.ortvalue_from_numpy(self.logits)
        # Bound first, so the prefill's freshly allocated logits are get_outputs()[0].
        self.binding.bind_ortvalue_output("logits", self._logits_value)
        buffers.bind_kv(self.binding, buffers.values(row, row + 1))
        self.token = np.zeros((1, 1), dtype=np.int64)
        self.seqlens = np.zeros((1,), dtype=np.int32)
        self.total = np.zeros((), dtype=np.int32)
        self.keep_last = np.ones(1, dtype=np.int64)
        self.keep_all = np.zeros(1, dtype=np.int64)
        if model.trims_logits:
            self.binding.bind_cpu_input("logits_to_keep", self.keep_all)
        self._token_value = ort.OrtValue.ortvalue_from_numpy(self.token)
        self.binding.bind_ortvalue_input("seqlens_k", ort.OrtValue.ortvalue_from_numpy(self.seqlens))
        self.binding.bind_ortvalue_input(
            "total_sequence_length", ort.OrtValue.ortvalue_from_numpy(self.total)
        )


class _BatchBinding:
    """Rows [lo, lo + width) of the KV buffers bound for one batched decode step."""

    def __init__(self, buffers: _SharedBuffers, lo: int, width: int, logits: np.ndarray) -> None:
        model = buffers.model
        self.binding = model.session.io_binding()
        self.ids = np.zeros((width, 1), dtype=np.int64)
        self.seqlens = np.zeros((width,), dtype=np.int32)
        self.total = np.zeros((), dtype=np.int32)
        self.logits = logits
        self.binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(self.logits))
        buffers.bind_kv(self.binding, buffers.values(lo, lo + width))
        self.binding.bind_ortvalue_input("input_ids", ort.OrtValue.ortvalue_from_numpy(self.ids))
        self.binding.bind_ortvalue_input("seqlens_k", ort.OrtValue.ortvalue_from_numpy(self.seqlens))
        self.binding.bind_ortvalue_input(
            "total_sequence_length", ort.OrtValue.ortvalue_from_numpy(self.total)
        )
        if model.trims_logits:
            self.binding.bind_cpu_input("logits_to_keep", np.zeros(1, dtype=np.int64))


class _SharedDecoder:
    def __init__(self, model: OnnxCausalLM, row: int, past_len: int = 0) -> None:
        # The model's buffers, not these: they may grow (into new arrays) while this sequence runs.
        self.model = model
        self.row = row
        self.past_len = past_len

    def step(self, token_ids: list[int], last_only: bool = False) -> np.ndarray:
        buffers = self.model._buffers
        assert buffers is not None
        b = buffers.by_row[self.row]
        seq = len(token_ids)
        total = self.past_len + seq
        if total > buffers.capacity:
            raise ContextTooLong(f"sequence of {total} positions exceeds the KV buffer of {buffers.capacity}")
        # Positions from past_len on are about to be written: what the cache said of them is over.
        b.cache.keep(self.past_len)
        b.seqlens[0] = total - 1
        b.total[()] = total
        session = self.model.session
        try:
            if seq == 1:
                # The hot path: every tensor is preallocated and already bound.
                b.token[0, 0] = token_ids[0]
                b.binding.bind_ortvalue_input("input_ids", b._token_value)
                b.binding.bind_ortvalue_output("logits", b._logits_value)
                session.run_with_iobinding(b.binding)
                logits: np.ndarray = b.logits[0]
            else:
                b.binding.bind_cpu_input("input_ids", np.asarray([token_ids], dtype=np.int64))
                if self.model.trims_logits:
                    b.binding.bind_cpu_input("logits_to_keep", b.keep_last if last_only else b.keep_all)
                b.binding.bind_output("logits")
                session.run_with_iobinding(b.binding)
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
