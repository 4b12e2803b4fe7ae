"""Exported ONNX graphs (decoder with KV cache) give PyTorch's greedy tokens, per architecture."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cloud.packaging.export import export_onnx, io_signature, read_hf_config, validate_export
from cloud.packaging.fused import UnsupportedArchitecture, build_fused, check_supported
from cloud.packaging.quantize import quantize_weight_only, weight_block_size
from shared.errors import PackagingError


def _tiny(kind: str, out: Path) -> Path:
    import torch
    from transformers import (
        GlmConfig,
        GlmForCausalLM,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(0)
    common = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
    attn = {"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}
    model: torch.nn.Module
    if kind == "glm":
        model = GlmForCausalLM(GlmConfig(**common, **attn, head_dim=16, pad_token_id=0, eos_token_id=1))
    elif kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, **attn, pad_token_id=0, eos_token_id=1))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, **attn, pad_token_id=0, eos_token_id=1))
    else:
        model = GPT2LMHeadModel(
            GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128, eos_token_id=1)
        )
    # Random weights give near-flat logits; scaling them up makes the greedy path decisive, so a
    # real export bug shows as a token mismatch rather than hiding in ties.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
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
    # Per layer: qkv, o, gate, up, down; plus lm_head.
    assert ops.count("MatMulNBits") == 2 * 5 + 1
    assert "MatMul" not in ops
    for n in nodes:
        if n.op_type == "MatMulNBits":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            assert attrs["bits"] == bits and attrs["block_size"] == block and attrs["accuracy_level"] == 4
    io = io_signature(q, cfg, {"eos_token_id": 1})
    report = validate_export(src, q, io, prompt_ids=[5, 17, 42, 99, 3, 250], new_tokens=8)
    assert report.max_abs_logit_diff < max_diff


def test_fused_builder_refuses_what_it_does_not_cover() -> None:
    base = {"model_type": "llama", "hidden_act": "silu"}
    check_supported(base)
    for bad in (
        {"model_type": "glm"},
        {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
        {"hidden_act": "gelu"},
        {"attention_bias": True},
        {"mlp_bias": True},
    ):
        with pytest.raises(UnsupportedArchitecture):
            check_supported({**base, **bad})
