"""Exported ONNX graphs (decoder with KV cache) give PyTorch's greedy tokens, per architecture."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloud.packaging.export import export_onnx, io_signature, read_hf_config, validate_export
from cloud.packaging.fused import UnsupportedArchitecture, build_fused, check_supported
from cloud.packaging.quantize import quantize_weight_only, weight_block_size
from shared.errors import PackagingError


def _tiny(kind: str, out: Path, *, vary_vectors: bool = False, **overrides: Any) -> Path:
    """A tiny random model of ``kind`` (vocab 256, hidden 64, 2 layers, 4 heads / 2 KV heads of 16);
    ``overrides`` replace config fields (e.g. ``sliding_window=8``, ``head_dim=32``).

    ``vary_vectors`` perturbs the 1-D weights too (biases start at 0 and norm gains at 1, so a
    graph that dropped or swapped one would otherwise still match)."""
    import torch
    import transformers

    torch.manual_seed(0)
    classes = {
        "glm": ("GlmConfig", "GlmForCausalLM"),
        "glm4": ("Glm4Config", "Glm4ForCausalLM"),
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "mistral": ("MistralConfig", "MistralForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    }
    model: Any  # a transformers PreTrainedModel
    if kind in classes:
        config_cls, model_cls = (getattr(transformers, n) for n in classes[kind])
        fields: dict[str, Any] = {
            "vocab_size": 256,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 128,
            "pad_token_id": 0,
            "eos_token_id": 1,
        }
        if kind not in ("llama", "qwen2"):  # those derive head_dim = hidden / heads = 16
            fields["head_dim"] = 16
        model = model_cls(config_cls(**{**fields, **overrides}))
    else:
        model = transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128, eos_token_id=1
            )
        )
    # Random weights give near-flat logits; scaling them up makes the greedy path decisive, so a
    # real export bug shows as a token mismatch rather than hiding in ties.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
            elif vary_vectors:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(str(out))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["glm", "llama", "qwen2", "gpt2"])
def test_onnx_greedy_tokens_equal_pytorch(kind: str, tmp_path: Path) -> None:
    src = _tiny(kind, tmp_path / "src")
    graph = export_onnx(src, tmp_path / "onnx")
    cfg = read_hf_config(src)
    gen_cfg = json.loads((tmp_path / "onnx" / "generation_config.json").read_text())
    io = io_signature(graph, cfg, gen_cfg)
    assert io.num_layers == 2
    assert io.model_type == kind
    report = validate_export(src, graph, io, prompt_ids=[5, 17, 42, 99, 3, 250], new_tokens=24)
    assert report.greedy_tokens_match, report
    assert report.compared_tokens == 24
    assert report.max_abs_logit_diff < 1e-3


def test_unsupported_or_missing_config_is_a_packaging_error(tmp_path: Path) -> None:
    with pytest.raises(PackagingError, match=r"config\.json is missing"):
        read_hf_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(PackagingError, match="not supported"):
        read_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(PackagingError, match="not valid JSON"):
        read_hf_config(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_fused_graph_greedy_tokens_equal_pytorch(kind: str, tmp_path: Path) -> None:
    """The fused decoder (GroupQueryAttention, KV cache updated in place) matches PyTorch."""
    src = _tiny(kind, tmp_path / "src")
    cfg = read_hf_config(src)
    graph = build_fused(src, cfg, tmp_path / "fused")
    io = io_signature(graph, cfg, {"eos_token_id": 1})
    assert io.kv_cache == "shared"
    report = validate_export(src, graph, io, prompt_ids=[5, 17, 42, 99, 3, 250], new_tokens=24)
    assert report.greedy_tokens_match, report
    assert report.max_abs_logit_diff < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize(("bits", "max_diff"), [(8, 0.5), (4, 2.0)])
def test_weight_only_fused_graph_uses_matmulnbits_and_stays_close(
    tmp_path: Path, bits: int, max_diff: float
) -> None:
    import onnx

    src = _tiny("llama", tmp_path / "src")
    cfg = read_hf_config(src)
    graph = build_fused(src, cfg, tmp_path / "fused")
    block = weight_block_size(bits, cfg["hidden_size"])
    q = quantize_weight_only(graph, tmp_path / f"int{bits}" / "model.onnx", bits, block)
    nodes = onnx.load(str(q), load_external_data=False).graph.node
    ops = [n.op_type for n in nodes]
    # Per layer: qkv (behind its skip-norm from the second layer on), o, down, and gate and up
    # with their skip-norm and SiLU·up as one function node (nbits_fusion.py); plus lm_head.
    assert ops.count("MatMulNBits") == 2 + 2 + 1 + 1
    assert ops.count("SkipRMSNormMatMulNBits") == 1 and ops.count("SkipRMSNormSwiGLU") == 2
    assert "MatMul" not in ops and "Sigmoid" not in ops
    for n in nodes:
        if n.op_type in ("MatMulNBits", "SkipRMSNormMatMulNBits", "SkipRMSNormSwiGLU"):
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            assert attrs["bits"] == bits and attrs["block_size"] == block and attrs["accuracy_level"] == 4
    io = io_signature(q, cfg, {"eos_token_id": 1})
    report = validate_export(src, q, io, prompt_ids=[5, 17, 42, 99, 3, 250], new_tokens=8)
    assert report.max_abs_logit_diff < max_diff


def test_fused_builder_refuses_what_it_does_not_cover() -> None:
    base = {"model_type": "llama", "hidden_act": "silu"}
    check_supported(base)
    dims = {"hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 128}
    for covered in (
        {"model_type": "glm"},
        {"model_type": "glm4", **dims, "head_dim": 16},  # 4 rotary pairs: cache padded to 8
        {"model_type": "qwen2"},
        {"model_type": "qwen3", **dims, "head_dim": 128},
        {"model_type": "mistral", **dims, "sliding_window": 8},
        {"model_type": "mistral", **dims, "sliding_window": None},
        # A window as long as the context never drops a key.
        {
            "model_type": "qwen3",
            **dims,
            "use_sliding_window": True,
            "sliding_window": 128,
            "max_window_layers": 0,
        },
        # Sliding window switched on, but no layer uses it.
        {
            "model_type": "qwen2",
            **dims,
            "use_sliding_window": True,
            "sliding_window": 8,
            "num_hidden_layers": 2,
        },
    ):
        check_supported({**base, **covered})
    for bad in (
        {"model_type": "gpt2"},
        {"model_type": "phi3"},
        {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
        {"model_type": "glm", "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
        {"hidden_act": "gelu"},
        {"model_type": "glm4", "hidden_act": "gelu_pytorch_tanh"},
        {"attention_bias": True},
        {"model_type": "qwen3", "attention_bias": True},  # biases o_proj too
        {"mlp_bias": True},
        {"use_sliding_window": True},
        {"partial_rotary_factor": 0.5},  # Llama rotates the whole head
        {**dims, "hidden_size": 4 * 72},  # head_dim 72: 36 cos columns, GQA wants a multiple of 8
        {"model_type": "glm", **dims, "head_dim": 8},  # 2 pairs: no cache width GQA takes
        {"model_type": "mistral", **dims, "sliding_window": 1},
        {
            "model_type": "qwen3",
            **dims,
            "use_sliding_window": True,
            "sliding_window": 8,
            "max_window_layers": 0,
        },
        {"model_type": "qwen3", "layer_types": ["sliding_attention", "full_attention"]},
        {
            "model_type": "qwen2",
            **dims,
            "use_sliding_window": True,
            "sliding_window": 8,
            "num_hidden_layers": 30,
        },
    ):
        with pytest.raises(UnsupportedArchitecture):
            check_supported({**base, **bad})


@pytest.mark.slow
def test_a_prefill_computes_the_logits_of_its_last_position_only(tmp_path: Path) -> None:
    """lm_head runs on the positions asked for: the last one for a prefill, all of them (the
    default) for perplexity and the export check; the last row is the same either way, int8 too."""
    from edge_agent.runtime.session import OnnxCausalLM

    src = _tiny("llama", tmp_path / "src")
    cfg = read_hf_config(src)
    graph = build_fused(src, cfg, tmp_path / "fused")
    int8 = quantize_weight_only(
        graph, tmp_path / "int8" / "model.onnx", 8, weight_block_size(8, cfg["hidden_size"])
    )
    ids = [5, 17, 42, 99, 3, 250, 7, 8]
    for path in (graph, int8):
        model = OnnxCausalLM(path, io_signature(path, cfg, {"eos_token_id": 1}))
        assert model.trims_logits
        model.prefix_cache = False
        full = model.decoder(len(ids)).step(ids).copy()
        last = model.decoder(len(ids)).step(ids, last_only=True)
        assert full.shape[0] == len(ids) and last.shape[0] == 1
        np.testing.assert_allclose(last[0], full[-1], rtol=1e-5, atol=1e-5)
