"""Hugging Face causal LM folder → ONNX decoder with KV cache, validated against PyTorch."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edge_agent.runtime.sampling import SamplingConfig, choose_token
from edge_agent.runtime.session import OnnxCausalLM
from shared.errors import PackagingError
from shared.manifest import ExportValidation, IOSignature, TensorSpec

log = logging.getLogger(__name__)

# All but gpt2 have a fused graph (fused.py, FUSED_MODEL_TYPES); optimum's export is the generic
# path. optimum 2.1 / optimum-onnx 0.1 have no glm4 (GLM-4-0414) export config, so glm4 packages
# only through the fused graph.
SUPPORTED_MODEL_TYPES = ("glm", "glm4", "llama", "mistral", "qwen2", "qwen3", "gpt2")
GRAPH_FILE = "model.onnx"


# Sizes a model's config.json gives (Llama-style names, then GPT-2's).
_POSITIVE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "n_embd",
    "n_layer",
    "n_head",
    "n_positions",
)


def load_hf_model(src: Path) -> Any:
    """The folder's model in float32; PackagingError naming the cause when its weights do not
    load (truncated or foreign files, sizes the weights do not have, a size torch cannot
    allocate), where it was a traceback from transformers, safetensors or torch."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32, local_files_only=True)
    except Exception as exc:  # transformers, safetensors and torch raise a dozen unrelated types
        raise PackagingError(
            f"cannot load the model in {src}: {type(exc).__name__}: {str(exc)[:500]}", src=str(src)
        ) from exc


def read_hf_config(src: Path) -> dict[str, Any]:
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise PackagingError("not a Hugging Face model folder: config.json is missing", src=str(src))
    try:
        cfg: dict[str, Any] = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise PackagingError(f"config.json is not valid JSON: {exc}", src=str(src)) from exc
    if not isinstance(cfg, dict):
        raise PackagingError("config.json is not a JSON object", src=str(src))
    for field in _POSITIVE_FIELDS:
        value = cfg.get(field)
        # Checked here, before torch: a negative, zero or non-integer size failed deep inside it
        # with an IndexError, a KeyError or a size mismatch.
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise PackagingError(
                f"config.json: {field} must be a positive integer, not {value!r}", src=str(src)
            )
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise PackagingError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}",
            src=str(src),
        )
    return cfg


def parameter_count(src: Path) -> int:
    """Parameters stored in the folder's safetensors files (0 when it has none)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as st:
            for name in st.keys():
                total += math.prod(st.get_slice(name).get_shape())
    return total


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter narrates tracing details (TracerWarnings, tied-weight notes) an operator
    cannot act on; failures still surface as exceptions."""
    names = ("transformers", "optimum", "torch.onnx")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for lg in loggers:
                lg.setLevel(logging.ERROR)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def export_onnx(src: Path, out: Path) -> Path:
    """Export with optimum (text-generation-with-past); returns the graph path."""
    from optimum.exporters.onnx import main_export

    try:
        with _quiet_exporter():
            main_export(
                str(src),
                str(out),
                task="text-generation-with-past",
                do_validation=False,
                local_files_only=True,
            )
    except Exception as exc:  # optimum raises many unrelated types
        raise PackagingError(f"ONNX export failed: {exc}", src=str(src)) from exc
    graph = out / GRAPH_FILE
    if not graph.is_file():
        raise PackagingError("exporter produced no model.onnx", src=str(src), out=str(out))
    return graph


def io_signature(graph: Path, cfg: dict[str, Any], generation_cfg: dict[str, Any]) -> IOSignature:
    """Read names and KV layout from the graph itself; limits and special tokens from the config."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    inputs = [TensorSpec(name=i.name, dtype=i.type, shape=list(i.shape)) for i in sess.get_inputs()]
    outputs = [TensorSpec(name=o.name, dtype=o.type, shape=list(o.shape)) for o in sess.get_outputs()]
    past = [i for i in sess.get_inputs() if i.name.startswith("past_key_values.") and i.name.endswith(".key")]
    if not past:
        raise PackagingError("exported graph has no past_key_values inputs", graph=str(graph))
    heads, head_dim = past[0].shape[1], past[0].shape[3]
    if not isinstance(heads, int) or not isinstance(head_dim, int):
        raise PackagingError("KV cache heads/head_dim are not static in the graph", graph=str(graph))
    kv_dtype: Literal["float32", "float16"] = "float16" if past[0].type == "tensor(float16)" else "float32"
    context = cfg.get("max_position_embeddings") or cfg.get("n_positions") or 2048
    eos = generation_cfg.get("eos_token_id", cfg.get("eos_token_id"))
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    return IOSignature(
        inputs=inputs,
        outputs=outputs,
        num_layers=len(past),
        num_kv_heads=heads,
        head_dim=head_dim,
        kv_dtype=kv_dtype,
        kv_cache="shared" if any(i.name == "seqlens_k" for i in inputs) else "concat",
        vocab_size=int(cfg.get("vocab_size") or outputs[0].shape[-1]),
        context_length=int(context),
        eos_token_ids=[int(e) for e in eos_ids],
        bos_token_id=generation_cfg.get("bos_token_id", cfg.get("bos_token_id")),
        pad_token_id=generation_cfg.get("pad_token_id", cfg.get("pad_token_id")),
        model_type=str(cfg["model_type"]),
    )


def onnx_greedy(model: OnnxCausalLM, prompt_ids: list[int], new_tokens: int) -> tuple[list[int], np.ndarray]:
    """Greedy continuation without EOS handling; also returns the prompt's last-position logits."""
    greedy = SamplingConfig(temperature=0.0)
    rng = np.random.default_rng(0)
    decoder = model.decoder(len(prompt_ids) + new_tokens)
    step = prompt_ids
    out: list[int] = []
    first_logits: np.ndarray | None = None
    for _ in range(new_tokens):
        logits = decoder.step(step)
        if first_logits is None:
            first_logits = logits.copy()
        token = choose_token(logits[-1], greedy, rng)
        out.append(token)
        step = [token]
    assert first_logits is not None
    return out, first_logits


def torch_greedy(src: Path, prompt_ids: list[int], new_tokens: int) -> tuple[list[int], np.ndarray]:
    import torch

    model = load_hf_model(src)
    model.eval()
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    with torch.no_grad():
        first = model(ids).logits[0].numpy()
        gen = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=model.config.pad_token_id if model.config.pad_token_id is not None else 0,
            eos_token_id=None,
        )
    return gen[0, len(prompt_ids) :].tolist(), first


def validate_export(
    src: Path, graph: Path, io: IOSignature, prompt_ids: list[int], new_tokens: int = 16
) -> ExportValidation:
    """Greedy tokens of the ONNX graph must equal PyTorch's; logits must agree closely."""
    model = OnnxCausalLM(graph, io, threads=0)
    ours, our_logits = onnx_greedy(model, prompt_ids, new_tokens)
    theirs, their_logits = torch_greedy(src, prompt_ids, new_tokens)
    diff = float(np.max(np.abs(our_logits - their_logits)))
    return ExportValidation(
        greedy_tokens_match=ours == theirs, compared_tokens=new_tokens, max_abs_logit_diff=diff
    )
