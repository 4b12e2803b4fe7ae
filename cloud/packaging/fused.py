"""A fused decoder graph for Llama-family models, built directly from the PyTorch weights.

optimum's export keeps every PyTorch op (about 60 ONNX nodes per layer, the KV cache concatenated
on every step). For batch-1 decode on a CPU those small nodes cost as much as the weights, so for
the architectures we know we build the graph ourselves from ONNX Runtime's fused operators:

    SkipSimplifiedLayerNormalization → MatMul(QKV packed) → GroupQueryAttention (rotary inside)
    → MatMul(O) → SkipSimplifiedLayerNormalization → MatMul(gate), MatMul(up) → SiLU·up → MatMul(down)

ten nodes per layer once ONNX Runtime fuses the SiLU into QuickGelu. GroupQueryAttention reads and
writes the KV cache in place when the caller binds the same buffer as ``past`` input and
``present`` output (``kv_cache="shared"`` in the manifest), so decode never copies the cache.
Weight-only int8 then turns every MatMul into ``MatMulNBits`` (see quantize.py).

Anything this builder does not cover exactly (other rotary scalings, biases it does not know,
non-SiLU activations) is refused with :class:`UnsupportedArchitecture`; the packager falls back
to the generic optimum export for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import PackagingError

FUSED_MODEL_TYPES = ("llama", "qwen2")
WEIGHTS_FILE = "model.onnx_data"


class UnsupportedArchitecture(PackagingError):
    """The fused builder does not cover this model exactly; use the generic export."""


def check_supported(cfg: dict[str, Any]) -> None:
    mt = cfg.get("model_type")
    if mt not in FUSED_MODEL_TYPES:
        raise UnsupportedArchitecture(f"no fused graph for model_type {mt!r}")
    scaling = cfg.get("rope_scaling")
    if scaling and (scaling.get("rope_type") or scaling.get("type")) not in (None, "default"):
        raise UnsupportedArchitecture(
            "rope scaling is not supported by the fused graph", rope_scaling=scaling
        )
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedArchitecture("only SiLU MLPs are fused", hidden_act=cfg.get("hidden_act"))
    if cfg.get("mlp_bias"):
        raise UnsupportedArchitecture("MLP biases are not fused")
    if mt == "llama" and cfg.get("attention_bias"):
        raise UnsupportedArchitecture("llama attention biases are not fused")
    if cfg.get("use_sliding_window"):
        raise UnsupportedArchitecture("sliding-window attention is not fused")


def build_fused(src: Path, cfg: dict[str, Any], out: Path) -> Path:
    """Write ``out/model.onnx`` (+ external weights) for the model in ``src``; returns the graph path."""
    import onnx
    import torch
    from onnx import TensorProto, helper, numpy_helper
    from transformers import AutoModelForCausalLM

    check_supported(cfg)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32, local_files_only=True)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    if "lm_head.weight" not in sd:  # tied embeddings
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]

    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    layers = int(cfg["num_hidden_layers"])
    eps = float(cfg.get("rms_norm_eps", 1e-6))
    theta = float(cfg.get("rope_theta", 10000.0))
    max_pos = int(cfg.get("max_position_embeddings", 2048))
    qkv_bias = cfg["model_type"] == "qwen2"

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

    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    freqs = np.outer(np.arange(max_pos, dtype=np.float64), inv_freq)
    cos = init("rotary.cos_cache", np.cos(freqs).astype(np.float32))
    sin = init("rotary.sin_cache", np.sin(freqs).astype(np.float32))

    embed = init("model.embed_tokens.weight", sd["model.embed_tokens.weight"])
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
        g = init(f"{tag}.weight", gamma.astype(np.float32))
        out = f"{tag}/out"
        if pending_skip is None:
            nodes.append(
                helper.make_node(
                    "SimplifiedLayerNormalization", [residual_in, g], [out], name=tag, epsilon=eps, axis=-1
                )
            )
        else:
            summed = f"{tag}/residual"
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

    for i in range(layers):
        p = f"model.layers.{i}"
        x = norm(f"{p}.input_layernorm", sd[f"{p}.input_layernorm.weight"])
        wq, wk, wv = (sd[f"{p}.self_attn.{n}_proj.weight"] for n in ("q", "k", "v"))
        bias = None
        if qkv_bias:
            bias = np.concatenate([sd[f"{p}.self_attn.{n}_proj.bias"] for n in ("q", "k", "v")])
        qkv = matmul(f"{p}.self_attn.qkv_proj", x, np.concatenate([wq, wk, wv]).T, bias)
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
                [qkv, "", "", past_k, past_v, "seqlens_k", "total_sequence_length", cos, sin],
                [attn, pres_k, pres_v],
                name=f"{p}.self_attn/GQA",
                domain="com.microsoft",
                num_heads=heads,
                kv_num_heads=kv_heads,
                do_rotary=1,
                rotary_interleaved=0,
                scale=float(head_dim**-0.5),
            )
        )
        pending_skip = matmul(f"{p}.self_attn.o_proj", attn, sd[f"{p}.self_attn.o_proj.weight"].T)

        x = norm(f"{p}.post_attention_layernorm", sd[f"{p}.post_attention_layernorm.weight"])
        # Two MatMuls rather than one packed gate‖up MatMul and a Split: the Split's copy and its
        # node cost more than the second weight-streaming node (+1.5-5.8 % int8 decode, bench/RESULTS.md).
        g_out = matmul(f"{p}.mlp.gate_proj", x, sd[f"{p}.mlp.gate_proj.weight"].T)
        u_out = matmul(f"{p}.mlp.up_proj", x, sd[f"{p}.mlp.up_proj.weight"].T)
        sig = f"{p}.mlp/sigmoid"
        nodes.append(helper.make_node("Sigmoid", [g_out], [sig], name=f"{p}.mlp/Sigmoid"))
        silu = f"{p}.mlp/silu"
        nodes.append(helper.make_node("Mul", [g_out, sig], [silu], name=f"{p}.mlp/SiLU"))
        act = f"{p}.mlp/act"
        nodes.append(helper.make_node("Mul", [silu, u_out], [act], name=f"{p}.mlp/Mul"))
        pending_skip = matmul(f"{p}.mlp.down_proj", act, sd[f"{p}.mlp.down_proj.weight"].T)

    final = norm("model.norm", sd["model.norm.weight"])
    w_head = init("lm_head.weight", sd["lm_head.weight"].T.astype(np.float32))
    nodes.append(helper.make_node("MatMul", [final, w_head], ["logits"], name="lm_head/MatMul"))

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
