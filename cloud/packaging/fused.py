"""A fused decoder graph for Llama-family models, built directly from the PyTorch weights.

optimum's export keeps every PyTorch op (about 60 ONNX nodes per layer, the KV cache concatenated
on every step). For batch-1 decode on a CPU those small nodes cost as much as the weights, so for
the architectures we know (``FUSED_MODEL_TYPES``: Llama, Mistral, Qwen2, Qwen3, GLM, GLM-4) we
build the graph ourselves from ONNX Runtime's fused operators:

    SkipSimplifiedLayerNormalization → MatMul(QKV packed) → GroupQueryAttention (rotary inside)
    → MatMul(O) → SkipSimplifiedLayerNormalization → MatMul(gate), MatMul(up) → SiLU·up → MatMul(down)

ten nodes per layer once ONNX Runtime fuses the SiLU into QuickGelu (five in a quantized graph on
the edge's kernels: nbits_fusion.py folds the norms and the MLP's activation into the matmuls).
GroupQueryAttention reads and writes the KV cache in place when the caller binds the same buffer
as ``past`` input and ``present`` output (``kv_cache="shared"`` in the manifest), so decode never
copies the cache.
Weight-only int8 then turns every MatMul into ``MatMulNBits`` (see quantize.py).

How an architecture differs from that Llama layer is one :class:`ArchSpec` in ``ARCHS``:

* q/k/v biases (Qwen2 always, GLM when ``attention_bias``): one Add after the packed MatMul;
* Qwen3's QK-norm (RMSNorm over head_dim of every q and k head, before the rotary): q, k and v
  come from three MatMuls, each norm is Reshape → SimplifiedLayerNormalization → Reshape, and
  GroupQueryAttention takes query, key and value as separate inputs;
* GLM's partial interleaved rotary: GroupQueryAttention rotates the first 2 × (cos cache columns)
  dims of each head pairwise ((0,1), (2,3), …) and copies the rest. It accepts only caches of a
  multiple of 8 columns, so a narrower one is padded with cos 1 / sin 0 columns, which rotate
  their pairs by zero — the same numbers, not an approximation;
* GLM's MLP stores gate and up stacked in one ``gate_up_proj``; it is split into the two MatMuls;
* GLM-4's sandwich norms: an RMSNorm on the attention output and on the MLP output before each
  residual add (a SimplifiedLayerNormalization ahead of the next skip-norm);
* Mistral's sliding window: GroupQueryAttention's ``local_window_size`` = ``sliding_window``. Both
  attend to that many keys, the current one included, from ONNX Runtime 1.24 on (PR #25927);
  1.23 and older attend to one key more, so such graphs need ONNX Runtime >= 1.24 (the builder
  refuses them under an older one, and the edge must run one too).

Anything this builder does not cover exactly (other rotary scalings, biases it does not know,
non-SiLU activations, Qwen sliding-window layers, rotary widths GroupQueryAttention cannot take)
is refused with :class:`UnsupportedArchitecture`, before or while the weights are read; the
generic optimum export is the path for those models.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cloud.packaging.export import load_hf_model
from shared.errors import PackagingError

WEIGHTS_FILE = "model.onnx_data"


class UnsupportedArchitecture(PackagingError):
    """The fused builder does not cover this model exactly; use the generic export."""


@dataclass(frozen=True)
class ArchSpec:
    """How one architecture's decoder layer differs from Llama's (all defaults: Llama)."""

    # Biases on q/k/v: never, always (Qwen2), or as the config's ``attention_bias`` says.
    qkv_bias: Literal["never", "always", "attention_bias"] = "never"
    # ``attention_bias`` when the config does not say (GlmConfig defaults to True).
    attention_bias_default: bool = False
    # ``attention_bias`` biases o_proj as well (Llama, Qwen3): not fused, so refused.
    attention_bias_on_output: bool = False
    # RMSNorm over head_dim on every q and k head before the rotary (Qwen3).
    qk_norm: bool = False
    # Rotary on pairs (0,1), (2,3), … (GLM) instead of on the two halves of the rotated dims.
    rotary_interleaved: bool = False
    # ``partial_rotary_factor`` when the config does not say; None: the architecture always
    # rotates the whole head, and a config asking for less is refused.
    partial_rotary_default: float | None = None
    # mlp.gate_up_proj holds gate then up, stacked (GLM), instead of gate_proj and up_proj.
    packed_gate_up: bool = False
    # RMSNorm on the attention output and on the MLP output before the residual add (GLM-4).
    sandwich_norms: bool = False
    # "uniform": ``sliding_window`` on every layer (Mistral); "per_layer": Qwen's
    # ``use_sliding_window``/``layer_types`` (refused when a layer really slides); "none": no
    # window (a config setting ``use_sliding_window`` is refused).
    sliding_window: Literal["none", "uniform", "per_layer"] = "none"


_GLM = ArchSpec(
    qkv_bias="attention_bias",
    attention_bias_default=True,
    rotary_interleaved=True,
    partial_rotary_default=0.5,
    packed_gate_up=True,
)
ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec(qkv_bias="attention_bias", attention_bias_on_output=True),
    "mistral": ArchSpec(sliding_window="uniform"),
    "qwen2": ArchSpec(qkv_bias="always", sliding_window="per_layer"),
    "qwen3": ArchSpec(
        qkv_bias="attention_bias", attention_bias_on_output=True, qk_norm=True, sliding_window="per_layer"
    ),
    "glm": _GLM,
    "glm4": replace(_GLM, sandwich_norms=True),
}
FUSED_MODEL_TYPES = tuple(ARCHS)


@dataclass(frozen=True)
class _Rotary:
    dim: int  # leading dims of each head that are rotated
    cache_cols: int  # columns of the cos/sin caches: dim / 2, padded to what GQA accepts


def _spec(cfg: dict[str, Any]) -> ArchSpec:
    mt = cfg.get("model_type")
    spec = ARCHS.get(str(mt))
    if spec is None:
        raise UnsupportedArchitecture(f"no fused graph for model_type {mt!r}")
    return spec


def _head_dim(cfg: dict[str, Any]) -> int | None:
    if cfg.get("head_dim"):
        return int(cfg["head_dim"])
    if cfg.get("hidden_size") and cfg.get("num_attention_heads"):
        return int(cfg["hidden_size"]) // int(cfg["num_attention_heads"])
    return None


def _rotary_factor(spec: ArchSpec, cfg: dict[str, Any]) -> float:
    """The fraction of each head that is rotated."""
    factor = cfg.get("partial_rotary_factor")
    if spec.partial_rotary_default is None:
        if factor not in (None, 1, 1.0):
            raise UnsupportedArchitecture(
                "partial rotary is not fused for this architecture", partial_rotary_factor=factor
            )
        return 1.0
    return float(factor if factor is not None else spec.partial_rotary_default)


def _rotary(spec: ArchSpec, cfg: dict[str, Any], head_dim: int) -> _Rotary:
    """The rotated width and the cos/sin cache width GroupQueryAttention will be given."""
    # As transformers' default rope init: int(head_dim * partial_rotary_factor).
    dim = int(head_dim * _rotary_factor(spec, cfg))
    if dim <= 0 or dim % 2:
        raise UnsupportedArchitecture("rotary width must be even and positive", rotary_dim=dim)
    # GroupQueryAttention (group_query_attention_helper.h) takes a cache of C columns, rotating
    # the first 2C dims, only when C % 8 == 0 and C <= (head_size / 16) * 8.
    cols, most = dim // 2, (head_dim // 16) * 8
    if cols % 8 == 0 and cols <= most:
        return _Rotary(dim, cols)
    padded = -(-cols // 8) * 8
    # Interleaved pairs past the rotated dims can be rotated by zero (cos 1, sin 0); with halves
    # (rotate_half) padding would change which dims pair up, so that case is refused.
    if spec.rotary_interleaved and padded <= most:
        return _Rotary(dim, padded)
    raise UnsupportedArchitecture(
        "GroupQueryAttention cannot apply this rotary width", head_dim=head_dim, rotary_dim=dim
    )


def _onnxruntime_version() -> tuple[int, int]:
    import onnxruntime

    major, minor = (int(x) for x in re.findall(r"\d+", onnxruntime.__version__)[:2])
    return major, minor


def _local_window(spec: ArchSpec, cfg: dict[str, Any]) -> int | None:
    """GroupQueryAttention's ``local_window_size``, or None for full causal attention."""
    max_pos = cfg.get("max_position_embeddings")
    if spec.sliding_window == "uniform":
        window = cfg.get("sliding_window")
        if window is None or (max_pos is not None and int(window) >= int(max_pos)):
            return None  # no position ever has more keys than the window
        if int(window) < 2:
            raise UnsupportedArchitecture(
                "sliding windows under 2 tokens are not fused", sliding_window=window
            )
        # transformers attends to keys q - window < k <= q, and so does GroupQueryAttention with
        # local_window_size = window from ONNX Runtime 1.24 on; up to 1.23 it took window + 1 keys.
        if _onnxruntime_version() < (1, 24):
            raise UnsupportedArchitecture(
                "sliding windows need onnxruntime >= 1.24 (local_window_size semantics)",
                sliding_window=window,
            )
        return int(window)
    if spec.sliding_window == "per_layer":
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
        types = cfg.get("layer_types")
        if types is not None:
            slides = any(t != "full_attention" for t in types)
        else:
            # As the Qwen configs derive it: layers from max_window_layers on slide.
            layers = cfg.get("num_hidden_layers")
            first = int(cfg.get("max_window_layers", 28))
            slides = window is not None and (layers is None or int(layers) > first)
        if slides and (window is None or max_pos is None or int(window) < int(max_pos)):
            raise UnsupportedArchitecture(
                "sliding-window attention layers are not fused", sliding_window=window, layer_types=types
            )
        return None
    if cfg.get("use_sliding_window"):
        raise UnsupportedArchitecture("sliding-window attention is not fused")
    return None


def check_supported(cfg: dict[str, Any]) -> None:
    """Refuse, with :class:`UnsupportedArchitecture`, what the fused graph would not match exactly."""
    spec = _spec(cfg)
    mt = cfg["model_type"]
    scaling = cfg.get("rope_scaling")
    if scaling and (scaling.get("rope_type") or scaling.get("type")) not in (None, "default"):
        raise UnsupportedArchitecture(
            "rope scaling is not supported by the fused graph", rope_scaling=scaling
        )
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedArchitecture("only SiLU MLPs are fused", hidden_act=cfg.get("hidden_act"))
    if cfg.get("mlp_bias"):
        raise UnsupportedArchitecture("MLP biases are not fused")
    if spec.attention_bias_on_output and cfg.get("attention_bias", spec.attention_bias_default):
        raise UnsupportedArchitecture(f"{mt} attention biases (o_proj included) are not fused")
    _rotary_factor(spec, cfg)
    head_dim = _head_dim(cfg)
    if head_dim is not None:
        _rotary(spec, cfg, head_dim)
    _local_window(spec, cfg)


def build_fused(src: Path, cfg: dict[str, Any], out: Path) -> Path:
    """Write ``out/model.onnx`` (+ external weights) for the model in ``src``; returns the graph path."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    check_supported(cfg)
    model = load_hf_model(src)
    # The loaded config carries the class defaults config.json may leave out (GLM's
    # attention_bias and partial_rotary_factor, Qwen3's layer_types): check again with them.
    cfg = {**cfg, **model.config.to_dict()}
    check_supported(cfg)
    spec = _spec(cfg)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    used: set[str] = set()

    def weight(name: str) -> np.ndarray:
        if name not in sd:
            raise UnsupportedArchitecture("the model lacks a weight the fused graph needs", weight=name)
        used.add(name)
        found: np.ndarray = sd[name]
        return found

    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(_head_dim(cfg) or hidden // heads)
    if sd["model.layers.0.self_attn.q_proj.weight"].shape[0] != heads * head_dim:
        raise UnsupportedArchitecture("q_proj does not match heads × head_dim", head_dim=head_dim)
    layers = int(cfg["num_hidden_layers"])
    eps = float(cfg.get("rms_norm_eps", 1e-6))
    theta = float(cfg.get("rope_theta", 10000.0))
    max_pos = int(cfg.get("max_position_embeddings", 2048))
    rotary = _rotary(spec, cfg, head_dim)
    local_window = _local_window(spec, cfg)
    qkv_bias = spec.qkv_bias == "always" or (
        spec.qkv_bias == "attention_bias" and bool(cfg.get("attention_bias", spec.attention_bias_default))
    )

    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def init(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def matmul(name: str, x: str, weight_t: np.ndarray, bias: np.ndarray | None = None) -> str:
        """``x @ weight_t`` where weight_t is [in, out] (PyTorch Linear weights transposed)."""
        w = init(f"{name}.weight", weight_t.astype(np.float32))
        y = f"{name}/out"
        nodes.append(helper.make_node("MatMul", [x, w], [y], name=f"{name}/MatMul"))
        if bias is not None:
            b = init(f"{name}.bias", bias.astype(np.float32))
            nodes.append(helper.make_node("Add", [y, b], [f"{name}/biased"], name=f"{name}/Add"))
            y = f"{name}/biased"
        return y

    def rms_norm(tag: str, x: str, gamma: np.ndarray) -> str:
        """RMSNorm of ``x`` over its last axis (not the residual stream)."""
        g = init(f"{tag}.weight", gamma.astype(np.float32))
        out = f"{tag}/out"
        nodes.append(
            helper.make_node("SimplifiedLayerNormalization", [x, g], [out], name=tag, epsilon=eps, axis=-1)
        )
        return out

    shapes: dict[tuple[int, ...], str] = {}

    def reshape(tag: str, x: str, shape: tuple[int, ...]) -> str:
        if shape not in shapes:
            shapes[shape] = init("shape." + "x".join(map(str, shape)), np.array(shape, dtype=np.int64))
        nodes.append(helper.make_node("Reshape", [x, shapes[shape]], [f"{tag}/out"], name=tag))
        return f"{tag}/out"

    def head_norm(tag: str, x: str, gamma: np.ndarray, n: int) -> str:
        """RMSNorm over head_dim of each of the ``n`` heads in ``x`` [batch, seq, n·head_dim]."""
        per_head = reshape(f"{tag}/split_heads", x, (0, 0, n, head_dim))
        normed = rms_norm(tag, per_head, gamma)
        return reshape(f"{tag}/merge_heads", normed, (0, 0, n * head_dim))

    inv_freq = 1.0 / (theta ** (np.arange(0, rotary.dim, 2, dtype=np.float64) / rotary.dim))
    freqs = np.outer(np.arange(max_pos, dtype=np.float64), inv_freq)
    pad = rotary.cache_cols - freqs.shape[1]  # identity rotations (see _rotary)
    cos_table = np.pad(np.cos(freqs), ((0, 0), (0, pad)), constant_values=1.0)
    sin_table = np.pad(np.sin(freqs), ((0, 0), (0, pad)), constant_values=0.0)
    cos = init("rotary.cos_cache", cos_table.astype(np.float32))
    sin = init("rotary.sin_cache", sin_table.astype(np.float32))

    embed = init("model.embed_tokens.weight", weight("model.embed_tokens.weight"))
    nodes.append(helper.make_node("Gather", [embed, "input_ids"], ["embeddings"], name="embed/Gather"))

    residual_in = "embeddings"
    pending_skip: str | None = None  # the tensor to add to the residual stream in the next norm
    graph_inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
    ]
    graph_outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", "vocab"])
    ]
    kv_shape: list[str | int | None] = ["batch", kv_heads, "kv_capacity", head_dim]
    present_shape: list[str | int | None] = ["batch", kv_heads, "kv_present", head_dim]

    def norm(tag: str, gamma: np.ndarray) -> str:
        """RMSNorm of the residual stream (after adding ``pending_skip``); updates the stream."""
        nonlocal residual_in, pending_skip
        if pending_skip is None:
            return rms_norm(tag, residual_in, gamma)
        g = init(f"{tag}.weight", gamma.astype(np.float32))
        out, summed = f"{tag}/out", f"{tag}/residual"
        nodes.append(
            helper.make_node(
                "SkipSimplifiedLayerNormalization",
                [pending_skip, residual_in, g],
                [out, "", "", summed],
                name=tag,
                domain="com.microsoft",
                epsilon=eps,
            )
        )
        residual_in, pending_skip = summed, None
        return out

    def attention_inputs(p: str, x: str) -> list[str]:
        """GroupQueryAttention's query, key, value inputs (packed QKV, or three with QK-norm)."""
        a = f"{p}.self_attn"
        ws = [weight(f"{a}.{n}_proj.weight") for n in ("q", "k", "v")]
        bs: list[np.ndarray | None] = [None] * 3
        if qkv_bias:
            bs = [weight(f"{a}.{n}_proj.bias") for n in ("q", "k", "v")]
        if not spec.qk_norm:
            bias = np.concatenate([b for b in bs if b is not None]) if qkv_bias else None
            return [matmul(f"{a}.qkv_proj", x, np.concatenate(ws).T, bias), "", ""]
        q, k, v = (matmul(f"{a}.{n}_proj", x, w.T, b) for n, w, b in zip("qkv", ws, bs, strict=True))
        q = head_norm(f"{a}.q_norm", q, weight(f"{a}.q_norm.weight"), heads)
        k = head_norm(f"{a}.k_norm", k, weight(f"{a}.k_norm.weight"), kv_heads)
        return [q, k, v]

    gqa_attrs: dict[str, Any] = {
        "num_heads": heads,
        "kv_num_heads": kv_heads,
        "do_rotary": 1,
        "rotary_interleaved": int(spec.rotary_interleaved),
        "scale": float(head_dim**-0.5),
    }
    if local_window is not None:
        gqa_attrs["local_window_size"] = local_window

    for i in range(layers):
        p = f"model.layers.{i}"
        x = norm(f"{p}.input_layernorm", weight(f"{p}.input_layernorm.weight"))
        qkv = attention_inputs(p, x)
        past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        pres_k, pres_v = f"present.{i}.key", f"present.{i}.value"
        graph_inputs += [
            helper.make_tensor_value_info(past_k, TensorProto.FLOAT, kv_shape),
            helper.make_tensor_value_info(past_v, TensorProto.FLOAT, kv_shape),
        ]
        graph_outputs += [
            helper.make_tensor_value_info(pres_k, TensorProto.FLOAT, present_shape),
            helper.make_tensor_value_info(pres_v, TensorProto.FLOAT, present_shape),
        ]
        attn = f"{p}.self_attn/out"
        nodes.append(
            helper.make_node(
                "GroupQueryAttention",
                [*qkv, past_k, past_v, "seqlens_k", "total_sequence_length", cos, sin],
                [attn, pres_k, pres_v],
                name=f"{p}.self_attn/GQA",
                domain="com.microsoft",
                **gqa_attrs,
            )
        )
        attn_out = matmul(f"{p}.self_attn.o_proj", attn, weight(f"{p}.self_attn.o_proj.weight").T)
        if spec.sandwich_norms:
            attn_out = rms_norm(
                f"{p}.post_self_attn_layernorm", attn_out, weight(f"{p}.post_self_attn_layernorm.weight")
            )
        pending_skip = attn_out

        x = norm(f"{p}.post_attention_layernorm", weight(f"{p}.post_attention_layernorm.weight"))
        if spec.packed_gate_up:
            gate_up = weight(f"{p}.mlp.gate_up_proj.weight")  # [gate; up], chunked in that order
            w_gate, w_up = np.split(gate_up, 2, axis=0)
        else:
            w_gate, w_up = weight(f"{p}.mlp.gate_proj.weight"), weight(f"{p}.mlp.up_proj.weight")
        # Two MatMuls rather than one packed gate‖up MatMul and a Split: the Split's copy and its
        # node cost more than the second weight-streaming node (+1.5-5.8 % int8 decode, bench/RESULTS.md).
        g_out = matmul(f"{p}.mlp.gate_proj", x, w_gate.T)
        u_out = matmul(f"{p}.mlp.up_proj", x, w_up.T)
        sig = f"{p}.mlp/sigmoid"
        nodes.append(helper.make_node("Sigmoid", [g_out], [sig], name=f"{p}.mlp/Sigmoid"))
        silu = f"{p}.mlp/silu"
        nodes.append(helper.make_node("Mul", [g_out, sig], [silu], name=f"{p}.mlp/SiLU"))
        act = f"{p}.mlp/act"
        nodes.append(helper.make_node("Mul", [silu, u_out], [act], name=f"{p}.mlp/Mul"))
        mlp_out = matmul(f"{p}.mlp.down_proj", act, weight(f"{p}.mlp.down_proj.weight").T)
        if spec.sandwich_norms:
            mlp_out = rms_norm(f"{p}.post_mlp_layernorm", mlp_out, weight(f"{p}.post_mlp_layernorm.weight"))
        pending_skip = mlp_out

    final = norm("model.norm", weight("model.norm.weight"))
    # Tied embeddings: the state dict may or may not list lm_head.weight beside embed_tokens.
    head = weight("lm_head.weight") if "lm_head.weight" in sd else sd["model.embed_tokens.weight"]
    w_head = init("lm_head.weight", head.T.astype(np.float32))
    # Logits of the last ``logits_to_keep`` positions only (0: all). A prefill needs the last
    # position's alone, and lm_head over a vocabulary of tens of thousands is about a fifth of its
    # compute; perplexity and the export check keep them all.
    graph_inputs.append(helper.make_tensor_value_info("logits_to_keep", TensorProto.INT64, [1]))
    nodes.append(helper.make_node("Neg", ["logits_to_keep"], ["lm_head/start"], name="lm_head/Neg"))
    ends = init("lm_head/ends", np.array([np.iinfo(np.int64).max], dtype=np.int64))
    axes = init("lm_head/axes", np.array([1], dtype=np.int64))
    nodes.append(
        helper.make_node(
            "Slice", [final, "lm_head/start", ends, axes], ["lm_head/kept"], name="lm_head/Slice"
        )
    )
    nodes.append(helper.make_node("MatMul", ["lm_head/kept", w_head], ["logits"], name="lm_head/MatMul"))

    # A weight the graph never read is computation it leaves out (a bias, a norm this builder
    # does not know): refuse rather than ship a graph that silently differs from the model.
    unused = sorted(set(sd) - used)
    if unused:
        raise UnsupportedArchitecture(
            "the model has weights the fused graph does not use", weights=unused[:4]
        )

    graph = helper.make_graph(nodes, "autoglm-fused-decoder", graph_inputs, graph_outputs, inits)
    onnx_model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
        producer_name="autoglm-fused",
    )
    onnx_model.ir_version = 10
    out.mkdir(parents=True, exist_ok=True)
    path = out / "model.onnx"
    onnx.save_model(
        onnx_model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=WEIGHTS_FILE,
        size_threshold=1024,
    )
    return path
