"""An exported decoder-with-past ONNX graph, driven by input name (GLM/Llama/Qwen2/GPT-2 exports)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from shared.errors import ModelLoadError
from shared.manifest import IOSignature

log = logging.getLogger(__name__)

_PROVIDER_ORDER = ("CUDAExecutionProvider", "CPUExecutionProvider")
_NP_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}

KVCache = dict[str, np.ndarray]


def choose_providers(preferred: list[str] | None = None) -> list[str]:
    """CUDA first when this onnxruntime build and device have it, CPU always last."""
    available = set(ort.get_available_providers())
    wanted = preferred or list(_PROVIDER_ORDER)
    chosen = [p for p in wanted if p in available]
    if "CPUExecutionProvider" not in chosen:
        chosen.append("CPUExecutionProvider")
    return chosen


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

    def empty_past(self, batch: int = 1) -> KVCache:
        shape = (batch, self.io.num_kv_heads, 0, self.io.head_dim)
        empty = np.zeros(shape, dtype=self.kv_dtype)
        return {name: empty for pair in self.past_names for name in pair}

    def forward(self, input_ids: np.ndarray, past: KVCache, past_len: int) -> tuple[np.ndarray, KVCache]:
        """Run one step over ``input_ids`` [batch, seq] after ``past_len`` cached positions."""
        batch, seq = input_ids.shape
        feeds: dict[str, np.ndarray] = {"input_ids": input_ids.astype(np.int64, copy=False)}
        if "attention_mask" in self.input_names:
            feeds["attention_mask"] = np.ones((batch, past_len + seq), dtype=np.int64)
        if "position_ids" in self.input_names:
            feeds["position_ids"] = np.broadcast_to(
                np.arange(past_len, past_len + seq, dtype=np.int64), (batch, seq)
            ).copy()
        feeds.update(past)
        outputs = self.session.run(self.output_names, feeds)
        present: KVCache = {}
        for (pk, pv), k, v in zip(self.past_names, outputs[1::2], outputs[2::2], strict=True):
            present[pk] = k
            present[pv] = v
        return outputs[0], present

    def sequence_logits(self, input_ids: np.ndarray) -> np.ndarray:
        """Logits for every position of a full sequence, with an empty cache."""
        logits, _ = self.forward(input_ids, self.empty_past(input_ids.shape[0]), 0)
        return logits


def perplexity(model: OnnxCausalLM, token_ids: list[int], window: int) -> tuple[float, int]:
    """Perplexity over non-overlapping windows; returns (perplexity, tokens scored)."""
    nll = 0.0
    scored = 0
    for start in range(0, len(token_ids) - 1, window):
        chunk = token_ids[start : start + window + 1]
        if len(chunk) < 2:
            break
        ids = np.asarray([chunk[:-1]], dtype=np.int64)
        logits = model.sequence_logits(ids)[0].astype(np.float64)
        logits -= logits.max(axis=-1, keepdims=True)
        logprobs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        targets = np.asarray(chunk[1:])
        nll -= float(logprobs[np.arange(len(targets)), targets].sum())
        scored += len(targets)
    if scored == 0:
        raise ValueError("need at least two tokens to measure perplexity")
    return float(np.exp(nll / scored)), scored
