"""The fused decoder for GLM, GLM-4, Qwen3 and Mistral gives PyTorch's tokens and logits.

Each case builds a tiny random model (tests/test_export.py ``_tiny``, with its biases and norm
gains perturbed so a dropped or swapped one shows), the fused graph from it, and compares:
greedy tokens over 6 + 32 positions (``validate_export``), and the logits of every position fed
one token at a time through the shared KV cache, the path decode takes.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloud.packaging import fused
from cloud.packaging.export import io_signature, onnx_greedy, read_hf_config, validate_export
from cloud.packaging.fused import UnsupportedArchitecture, build_fused, check_supported
from cloud.packaging.quantize import quantize_weight_only, weight_block_size
from edge_agent.runtime.kernels import library
from edge_agent.runtime.session import OnnxCausalLM
from tests.test_export import _tiny

PROMPT = [5, 17, 42, 99, 3, 250]
NEW_TOKENS = 32
KINDS = ["glm", "glm4", "qwen3", "mistral"]


def _torch_logits(src: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32, local_files_only=True)
    with torch.no_grad():
        logits: np.ndarray = model(torch.tensor([ids])).logits[0].numpy()
    return logits


def _stepwise_logits(model: OnnxCausalLM, ids: list[int]) -> np.ndarray:
    """Logits of every position, fed one token per step (the decode path, KV cache in place)."""
    decoder = model.decoder(len(ids))
    return np.stack([decoder.step([t])[-1].copy() for t in ids])


def _gqa_attrs(graph: Path) -> list[dict[str, Any]]:
    import onnx

    nodes = onnx.load(str(graph), load_external_data=False).graph.node
    return [
        {"inputs": list(n.input), **{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}}
        for n in nodes
        if n.op_type == "GroupQueryAttention"
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "overrides"),
    [
        ("glm", {}),  # head_dim 16: 8 rotary dims, cos cache padded from 4 to 8 columns
        ("glm", {"head_dim": 32}),  # 16 rotary dims: 8 columns, as GQA takes them (GLM-4-9B: 64 of 128)
        ("glm", {"attention_bias": False}),
        ("glm4", {}),
        ("glm4", {"head_dim": 32}),
        ("qwen3", {}),
        ("qwen3", {"head_dim": 32}),  # head_dim apart from hidden / heads (4 × 32 ≠ 64)
        ("mistral", {}),  # sliding_window 4096 ≥ 128 positions: plain causal attention
        ("mistral", {"sliding_window": 8}),  # 38 positions through a window of 8
    ],
    ids=lambda v: ("-".join(f"{k}={x}" for k, x in v.items()) or "default") if isinstance(v, dict) else v,
)
def test_fused_graph_equals_pytorch(kind: str, overrides: dict[str, Any], tmp_path: Path) -> None:
    src = _tiny(kind, tmp_path / "src", vary_vectors=True, **overrides)
    cfg = read_hf_config(src)
    graph = build_fused(src, cfg, tmp_path / "fused")
    io = io_signature(graph, cfg, {"eos_token_id": 1})
    assert io.kv_cache == "shared"
    assert io.model_type == kind

    report = validate_export(src, graph, io, prompt_ids=PROMPT, new_tokens=NEW_TOKENS)
    assert report.greedy_tokens_match, report
    assert report.compared_tokens == NEW_TOKENS
    assert report.max_abs_logit_diff < 1e-3

    # Every position of the prompt and its greedy continuation, decoded one step at a time and in
    # one prefill: past the window for the sliding-window case, in both paths; on onnxruntime's
    # attention and, where this CPU runs them, on the edge's own kernels.
    model = OnnxCausalLM(graph, io)
    ids = PROMPT + onnx_greedy(model, PROMPT, NEW_TOKENS)[0]
    theirs = _torch_logits(src, ids)
    engines = [model]
    if library() is not None:
        engines.append(OnnxCausalLM(graph, io, custom_ops=library()))
        assert engines[-1].custom_ops_loaded
    for engine in engines:
        assert np.abs(_stepwise_logits(engine, ids) - theirs).max() < 1e-3
        assert np.abs(engine.sequence_logits(ids) - theirs).max() < 1e-3

    attrs = _gqa_attrs(graph)
    assert len(attrs) == 2
    window = overrides.get("sliding_window")
    if kind == "mistral" and window is not None:
        # Both attend to `window` keys, the current one included (q - window < k <= q).
        assert all(a["local_window_size"] == window for a in attrs)
        # The window matters here: without it the same weights give other logits.
        full = _tiny(kind, tmp_path / "full", vary_vectors=True, **{**overrides, "sliding_window": None})
        assert np.abs(_torch_logits(full, ids) - theirs)[window:].max() > 1e-2
    else:
        assert all("local_window_size" not in a for a in attrs)
    assert all(a["rotary_interleaved"] == int(kind.startswith("glm")) for a in attrs)
    # Qwen3 feeds query, key and value separately (each q/k head normalized first); the rest packed.
    assert all((a["inputs"][1] != "") == (kind == "qwen3") for a in attrs)


def test_sliding_window_needs_onnxruntime_1_24(monkeypatch: pytest.MonkeyPatch) -> None:
    """Up to 1.23 GroupQueryAttention attended to local_window_size + 1 keys: one too many."""
    cfg = {"model_type": "mistral", "max_position_embeddings": 128, "sliding_window": 8}
    check_supported(cfg)
    monkeypatch.setattr(fused, "_onnxruntime_version", lambda: (1, 23))
    with pytest.raises(UnsupportedArchitecture, match=r"1\.24"):
        check_supported(cfg)
    check_supported({**cfg, "sliding_window": None})
    check_supported({**cfg, "sliding_window": 128})  # never narrower than the context


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_int8_fused_graph_uses_matmulnbits(kind: str, tmp_path: Path) -> None:
    import onnx

    src = _tiny(kind, tmp_path / "src", vary_vectors=True)
    cfg = read_hf_config(src)
    graph = build_fused(src, cfg, tmp_path / "fused")
    block = weight_block_size(8, cfg["hidden_size"])
    q = quantize_weight_only(graph, tmp_path / "int8" / "model.onnx", 8, block)
    ops = [n.op_type for n in onnx.load(str(q), load_external_data=False).graph.node]
    # Per layer: q, k, v (Qwen3: apart, for its QK-norm) or qkv packed, o, gate, up, down; lm_head.
    # Gate and up are one fused node (two matrices) with the norm before them, and a packed QKV
    # takes its norm too (nbits_fusion.py).
    per_layer = 7 if kind == "qwen3" else 5
    matrices = {
        "MatMulNBits": 1,
        "SkipRMSNormMatMulNBits": 1,
        "SkipRMSNormMatMulNBitsBias": 1,
        "SkipRMSNormSwiGLU": 2,
        "MatMulNBitsSwiGLU": 2,
    }
    assert sum(matrices.get(op, 0) for op in ops) == 2 * per_layer + 1
    assert ops.count("SkipRMSNormSwiGLU") == 2
    # A packed QKV with its norm (not the first layer's), and with its q/k/v bias where it has one
    # (GLM's attention_bias, default true).
    biased = kind != "qwen3" and bool(cfg.get("attention_bias", kind in ("glm", "glm4")))
    assert ops.count("SkipRMSNormMatMulNBitsBias") == int(biased)
    assert ops.count("SkipRMSNormMatMulNBits") == int(kind != "qwen3" and not biased)
    assert "MatMul" not in ops and "Sigmoid" not in ops
    io = io_signature(q, cfg, {"eos_token_id": 1})
    report = validate_export(src, q, io, prompt_ids=PROMPT, new_tokens=8)
    assert report.max_abs_logit_diff < 0.5
    # The edge's kernels (the fused nodes as the library's ops) decode alike.
    if library() is not None:
        ours = OnnxCausalLM(q, io, threads=2, custom_ops=library())
        assert ours.custom_ops_loaded
        a, b = ours.sequence_logits(PROMPT), OnnxCausalLM(q, io, threads=2).sequence_logits(PROMPT)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-3 * float(np.abs(b).max()))


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cloud.packaging.corpus import heldout_text
    from cloud.packaging.demo_model import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(heldout_text(200_000), 300, out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_packager_ships_the_fused_graph(kind: str, tmp_path: Path, tokenizer_dir: Path) -> None:
    from cloud.packaging.packager import ModelPackager, PackageOptions
    from cloud.registry import ModelRegistry
    from shared.signing import SigningKey

    src = _tiny(kind, tmp_path / "src", vary_vectors=True, vocab_size=300)  # the tokenizer's 300
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, src / f.name)
    entry = ModelPackager(ModelRegistry(tmp_path / "registry"), SigningKey.generate()).package(
        src, PackageOptions(name=f"tiny-{kind}", version="1", quantize="none")
    )
    manifest = entry.manifest
    assert manifest.io.kv_cache == "shared"
    assert manifest.io.model_type == kind
    assert manifest.validation is not None
    assert manifest.validation.greedy_tokens_match
    assert manifest.validation.max_abs_logit_diff < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["glm", "qwen3"])  # packed QKV; separate Q, K, V
def test_a_quantized_package_keeps_its_kv_cache_in_half_precision(
    kind: str, tmp_path: Path, tokenizer_dir: Path
) -> None:
    """``kv_cache="auto"``: int8 weights ship a float16 cache (GroupQueryAttentionHalfKV), which
    decodes like the float cache on the edge's kernels and on onnxruntime's (the function body)."""
    import onnx

    from cloud.packaging.half_kv import OP, half_kv_file
    from cloud.packaging.packager import ModelPackager, PackageOptions
    from cloud.registry import ModelRegistry
    from shared.signing import SigningKey

    src = _tiny(kind, tmp_path / "src", vary_vectors=True, vocab_size=300)
    for f in tokenizer_dir.iterdir():
        shutil.copy2(f, src / f.name)
    packager = ModelPackager(ModelRegistry(tmp_path / "registry"), SigningKey.generate())
    io = packager.package(src, PackageOptions(name="m", version="int8", quantize="int8")).manifest.io
    assert io.kv_dtype == "float16"
    past = [t for t in io.inputs if t.name.startswith("past_key_values.")]
    assert past and {t.dtype for t in past} == {"tensor(float16)"}
    kept = packager.package(
        src, PackageOptions(name="m", version="int8-f32", quantize="int8", kv_cache="float32")
    )
    assert kept.manifest.io.kv_dtype == "float32"
    reference = packager.package(src, PackageOptions(name="m", version="fp32", quantize="none"))
    assert reference.manifest.io.kv_dtype == "float32"
    asked = packager.package(
        src, PackageOptions(name="m", version="fp32-f16", quantize="none", kv_cache="float16")
    ).manifest
    assert asked.io.kv_dtype == "float16"
    assert asked.quality is not None and asked.quality.greedy is not None  # measured against fp32

    # The same rewrite on the float graph (quantized activations would add their own rounding
    # flips): logits fed one token at a time through the shared cache, float cache vs half.
    cfg = read_hf_config(src)
    build_fused(src, cfg, tmp_path / "fused")
    shutil.copytree(tmp_path / "fused", tmp_path / "half")
    graph = tmp_path / "half" / "model.onnx"

    def logits(lm: OnnxCausalLM) -> np.ndarray:
        decoder = lm.decoder(64)
        return np.stack([decoder.step([t])[0].copy() for t in PROMPT])

    floats = tmp_path / "fused" / "model.onnx"
    expected = logits(OnnxCausalLM(floats, io_signature(floats, cfg, {"eos_token_id": 1}), threads=2))
    assert half_kv_file(graph) == 2
    assert {n.op_type for n in onnx.load(str(graph), load_external_data=False).graph.node} >= {OP}
    io16 = io_signature(graph, cfg, {"eos_token_id": 1})
    assert io16.kv_dtype == "float16"
    runs = [OnnxCausalLM(graph, io16, threads=2)]
    if library() is not None:
        runs.append(OnnxCausalLM(graph, io16, threads=2, custom_ops=library()))
        assert runs[-1].custom_ops_loaded
    for lm in runs:
        np.testing.assert_allclose(logits(lm), expected, rtol=0, atol=5e-3 * float(np.abs(expected).max()))


def test_a_float16_cache_asked_of_a_graph_without_groupqueryattention_is_refused(tmp_path: Path) -> None:
    """A generic export (no GroupQueryAttention) keeps its float cache under ``auto``; asked for
    float16 by name, the packager refuses rather than ship something else."""
    import onnx
    from onnx import TensorProto, helper

    from cloud.packaging.packager import ModelPackager, PackageOptions
    from cloud.registry import ModelRegistry
    from shared.errors import PackagingError
    from shared.signing import SigningKey

    folder = tmp_path / "generic"
    folder.mkdir()
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph), str(folder / "model.onnx"))
    packager = ModelPackager(ModelRegistry(tmp_path / "registry"), SigningKey.generate())
    auto = PackageOptions(name="m", version="1", quantize="int8")
    assert packager._half_kv(tmp_path / "fp32", folder, tmp_path, auto) is None
    with pytest.raises(PackagingError, match="fused graph"):
        packager._half_kv(folder, folder, tmp_path, PackageOptions(name="m", version="1", kv_cache="float16"))
    assert not (tmp_path / "fp32-half-kv").exists()  # the copy made for it is not left behind


def test_a_custom_op_library_that_onnxruntime_refuses_leaves_its_own_kernels(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """OnnxCausalLM(custom_ops=...) is how the edge registers its kernels (edge_agent.runtime.kernels);
    a library the session refuses must cost nothing but a warning."""
    src = _tiny("llama", tmp_path / "src")
    cfg = read_hf_config(src)
    graph = build_fused(src, cfg, tmp_path / "fused")
    io = io_signature(graph, cfg, {"eos_token_id": 1})
    not_a_library = tmp_path / "libnothing.so"
    not_a_library.write_bytes(b"not an ELF file")
    with caplog.at_level("WARNING", logger="edge_agent.runtime.session"):
        model = OnnxCausalLM(graph, io, custom_ops=not_a_library)
    assert not model.custom_ops_loaded
    assert any(str(not_a_library) in r.getMessage() for r in caplog.records)
    plain = OnnxCausalLM(graph, io)
    assert not plain.custom_ops_loaded
    assert np.array_equal(model.sequence_logits(PROMPT), plain.sequence_logits(PROMPT))
