"""The packager's folding of a layer's small nodes into its quantized matmuls
(cloud/packaging/nbits_fusion.py): what it fuses, what it leaves alone, and that the graph stays a
valid ONNX model whose functions onnxruntime inlines where the edge's library is absent. The ops'
numbers against onnxruntime's are in tests/test_kernels.py."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from cloud.packaging.export import io_signature, read_hf_config
from cloud.packaging.fused import build_fused
from cloud.packaging.nbits_fusion import (
    FLOAT_MATMUL,
    FLOAT_NORM_MATMUL,
    FLOAT_NORM_MATMUL_BIAS,
    FLOAT_NORM_SWIGLU,
    FUSED_OPS,
    NORM_MATMUL,
    NORM_MATMUL_BIAS,
    NORM_SWIGLU,
    SWIGLU,
    fuse_file,
    fuse_layers,
)
from cloud.packaging.quantize import quantize_weight_only
from edge_agent.runtime.session import OnnxCausalLM
from tests.test_export import _tiny

K, N = 64, 96


def _nbits(name: str, a: str, out: str, bias: bool = False) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    """A MatMulNBits node as the quantizer writes it (4 bits, blocks of 32), with its initializers."""
    rng = np.random.default_rng(len(name))
    weights = rng.integers(0, 256, (N, K // 32, 16), dtype=np.uint8)
    scales = (rng.random(N * K // 32) * 0.01).astype(np.float32)
    inits = [numpy_helper.from_array(weights, f"{name}.B"), numpy_helper.from_array(scales, f"{name}.s")]
    inputs = [a, f"{name}.B", f"{name}.s"]
    if bias:
        inits.append(numpy_helper.from_array(np.ones(N, np.float32), f"{name}.bias"))
        inputs += ["", "", f"{name}.bias"]
    node = helper.make_node(
        "MatMulNBits",
        inputs,
        [out],
        name=name,
        domain="com.microsoft",
        K=K,
        N=N,
        bits=4,
        block_size=32,
        accuracy_level=4,
    )
    return node, inits


def _skip_norm(eps: bool = True) -> onnx.NodeProto:
    """skip-norm(x, skip) → normed (and the sum), as fused.py writes a layer's norm."""
    return helper.make_node(
        "SkipSimplifiedLayerNormalization",
        ["x", "skip", "gamma"],
        ["normed", "", "", "sum"],
        name="norm",
        domain="com.microsoft",
        **({"epsilon": 1e-6} if eps else {}),
    )


def _model(
    *,
    gate_read_elsewhere: bool = False,
    norm_readers: int = 1,
    up_bias: bool = False,
    eps: bool = True,
    sum_read_early: bool = False,
) -> onnx.ModelProto:
    """skip-norm(x, skip) → gate, up → SiLU·up → y, as fused.py + quantize.py write it."""
    gamma = numpy_helper.from_array(np.ones(K, np.float32), "gamma")
    norm = _skip_norm(eps)
    gate, gate_inits = _nbits("gate", "normed", "g")
    up, up_inits = _nbits("up", "normed", "u", bias=up_bias)
    nodes = [
        norm,
        gate,
        up,
        helper.make_node("Sigmoid", ["g"], ["sig"], name="Sigmoid"),
        helper.make_node("Mul", ["g", "sig"], ["silu"], name="SiLU"),
        helper.make_node("Mul", ["silu", "u"], ["y"], name="Mul"),
    ]
    outputs = [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", N]),
        helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["M", K]),
    ]
    if sum_read_early:  # a reader of the sum between the norm and the matmuls, in node order
        nodes.insert(1, helper.make_node("Neg", ["sum"], ["neg_sum"], name="early"))
        outputs.append(helper.make_tensor_value_info("neg_sum", TensorProto.FLOAT, ["M", K]))
    inits = [gamma, *gate_inits, *up_inits]
    if gate_read_elsewhere:
        nodes.append(helper.make_node("Identity", ["g"], ["g_too"], name="probe"))
        outputs.append(helper.make_tensor_value_info("g_too", TensorProto.FLOAT, ["M", N]))
    for i in range(norm_readers - 1):  # Qwen3's q, k and v read one norm
        extra, extra_inits = _nbits(f"extra{i}", "normed", f"e{i}")
        nodes.append(extra)
        inits += extra_inits
        outputs.append(helper.make_tensor_value_info(f"e{i}", TensorProto.FLOAT, ["M", N]))
    graph = helper.make_graph(
        nodes,
        "layer",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K]),
            helper.make_tensor_value_info("skip", TensorProto.FLOAT, ["M", K]),
        ],
        outputs,
        inits,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _run(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return list(session.run(None, feed))


def _feed() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x": rng.standard_normal((3, K)).astype(np.float32),
        "skip": rng.standard_normal((3, K)).astype(np.float32),
    }


@pytest.mark.parametrize("sum_read_early", [False, True])
def test_a_gated_mlp_and_its_norm_become_one_node_that_onnxruntime_inlines_alike(
    sum_read_early: bool,
) -> None:
    model = _model(sum_read_early=sum_read_early)
    before = _run(model, _feed())
    counts = fuse_layers(model)
    assert counts == {**dict.fromkeys(FUSED_OPS, 0), NORM_SWIGLU: 1}
    # The fused node takes the group's first place: the order stays topological (checked below).
    assert _ops(model) == ([NORM_SWIGLU, "Neg"] if sum_read_early else [NORM_SWIGLU])
    assert [f.name for f in model.functions] == [NORM_SWIGLU]
    onnx.checker.check_model(model, full_check=True)
    after = _run(model, _feed())  # no library: the function's body runs
    for a, b in zip(before, after, strict=True):
        assert np.array_equal(a, b)


def test_what_the_fused_node_would_hide_is_left_alone() -> None:
    # The gate's output read by another node: the MLP stays; the norm has two readers then.
    model = _model(gate_read_elsewhere=True)
    assert not any(fuse_layers(model).values())
    assert "Sigmoid" in _ops(model) and not model.functions
    # A norm read by three matmuls (Qwen3's q, k, v): the MLP fuses, the norm stays.
    model = _model(norm_readers=3)
    fuse_layers(model)
    assert Counter(_ops(model)) == Counter(
        {"SkipSimplifiedLayerNormalization": 1, SWIGLU: 1, "MatMulNBits": 2}
    )
    # An up projection with a bias (the fused ops pack none).
    model = _model(up_bias=True)
    fuse_layers(model)
    assert "Sigmoid" in _ops(model) and SWIGLU not in _ops(model)
    # A norm without an explicit epsilon: its default is onnxruntime's, not written here.
    model = _model(eps=False)
    fuse_layers(model)
    assert _ops(model) == ["SkipSimplifiedLayerNormalization", SWIGLU]


def _biased_qkv(
    *, floats: bool, bias_len: int = N, bias_is_input: bool = False, unbiased_read: bool = False
) -> onnx.ModelProto:
    """skip-norm(x, skip) → the packed QKV matmul → Add(·, bias) → y, as fused.py writes a Qwen2
    layer's attention input (quantize.py then makes the MatMul a MatMulNBits)."""
    norm = _skip_norm()
    rng = np.random.default_rng(7)
    inits = [numpy_helper.from_array(np.ones(K, np.float32), "gamma")]
    if floats:
        matmul = helper.make_node("MatMul", ["normed", "W"], ["xw"], name="qkv")
        inits.append(numpy_helper.from_array(rng.standard_normal((K, N)).astype(np.float32), "W"))
    else:
        matmul, weights = _nbits("qkv", "normed", "xw")
        inits += weights
    # The bias first, as an Add may have it: the fused op adds it all the same.
    add = helper.make_node("Add", ["bias", "xw"], ["y"], name="qkv/Add")
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K]),
        helper.make_tensor_value_info("skip", TensorProto.FLOAT, ["M", K]),
    ]
    bias = numpy_helper.from_array(rng.standard_normal(bias_len).astype(np.float32), "bias")
    if bias_is_input:  # an initializer a caller may override: not a constant
        inputs.append(helper.make_tensor_value_info("bias", TensorProto.FLOAT, [bias_len]))
    inits.append(bias)
    outputs = [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", N]),
        helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["M", K]),
    ]
    if unbiased_read:
        outputs.append(helper.make_tensor_value_info("xw", TensorProto.FLOAT, ["M", N]))
    graph = helper.make_graph([norm, matmul, add], "qkv", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


@pytest.mark.parametrize("floats", [False, True])
def test_a_norm_its_matmul_and_the_bias_add_after_it_become_one_node_that_onnxruntime_inlines_alike(
    floats: bool,
) -> None:
    model = _biased_qkv(floats=floats)
    before = _run(model, _feed())
    op = FLOAT_NORM_MATMUL_BIAS if floats else NORM_MATMUL_BIAS
    assert fuse_layers(model) == {**dict.fromkeys(FUSED_OPS, 0), op: 1}
    assert _ops(model) == [op] and [f.name for f in model.functions] == [op]
    onnx.checker.check_model(model, full_check=True)
    after = _run(model, _feed())  # no library: the function's body runs
    for a, b in zip(before, after, strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("floats", [False, True])
def test_a_bias_add_the_op_cannot_take_stays_a_node_of_its_own(floats: bool) -> None:
    plain = FLOAT_NORM_MATMUL if floats else NORM_MATMUL
    # A vector of another length (broadcast over the rows another way), one a caller may feed,
    # and a matmul output something else reads too: the norm and matmul fuse, the Add stays.
    for model in (
        _biased_qkv(floats=floats, bias_len=1),
        _biased_qkv(floats=floats, bias_is_input=True),
        _biased_qkv(floats=floats, unbiased_read=True),
    ):
        assert fuse_layers(model)[plain] == 1
        assert _ops(model) == [plain, "Add"]
        onnx.checker.check_model(model, full_check=True)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_a_quantized_fused_decoder_runs_five_nodes_per_layer_and_decodes_alike_inlined(
    kind: str, tmp_path: Path
) -> None:
    src = _tiny(kind, tmp_path / "src", vary_vectors=True)
    cfg = read_hf_config(src)
    fp32 = build_fused(src, cfg, tmp_path / "fused")
    graph = quantize_weight_only(fp32, tmp_path / "int8" / "model.onnx", 8, 64)
    model = onnx.load(str(graph), load_external_data=False)
    ops = Counter(_ops(model))
    layers = cfg["num_hidden_layers"]
    # The first layer's norm has no skip (a plain RMSNorm before the QKV matmul); Qwen2's q/k/v
    # bias goes into the op after it.
    norm_matmul = NORM_MATMUL_BIAS if kind == "qwen2" else NORM_MATMUL
    assert ops[NORM_SWIGLU] == layers and ops[norm_matmul] == layers - 1
    assert ops[NORM_MATMUL] + ops[NORM_MATMUL_BIAS] == layers - 1
    assert ops["GroupQueryAttention"] == layers and "Sigmoid" not in ops
    # The same graph with the functions inlined by hand (onnx's inliner) decodes to the same logits
    # on onnxruntime's kernels: the functions' bodies are the nodes they replaced.
    from onnx import inliner

    inlined = inliner.inline_local_functions(onnx.load(str(graph)))
    assert not inlined.functions and "SkipSimplifiedLayerNormalization" in _ops(inlined)
    flat = tmp_path / "flat" / "model.onnx"
    flat.parent.mkdir()
    onnx.save(inlined, str(flat), save_as_external_data=True)
    io = io_signature(graph, cfg, {"eos_token_id": 1})
    prompt = [5, 17, 42, 99, 3, 250, 7]
    a = OnnxCausalLM(graph, io, threads=1).sequence_logits(prompt)
    b = OnnxCausalLM(flat, io, threads=1).sequence_logits(prompt)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_an_fp32_fused_decoder_runs_five_nodes_per_layer_alike_inlined_and_close_on_the_library(
    kind: str, tmp_path: Path
) -> None:
    """The graph the packager ships unquantized: its matmuls the float ops. Without the library
    onnxruntime inlines the functions and computes what the plain graph computes, bit for bit;
    with it, the same within float rounding (the sums run in another order) and the same tokens."""
    from edge_agent.runtime.kernels import library

    src = _tiny(kind, tmp_path / "src", vary_vectors=True)
    cfg = read_hf_config(src)
    plain = build_fused(src, cfg, tmp_path / "fused")
    fused = plain.with_name("float-ops.onnx")
    counts = fuse_file(plain, fused)
    layers = cfg["num_hidden_layers"]
    # Per layer: the MLP with its norm, o_proj and down; the QKV with its norm but in layer 0
    # (a plain RMSNorm, no skip); and the lm_head.
    norm_matmul = FLOAT_NORM_MATMUL_BIAS if kind == "qwen2" else FLOAT_NORM_MATMUL
    assert counts[FLOAT_NORM_SWIGLU] == layers and counts[norm_matmul] == layers - 1
    assert counts[FLOAT_NORM_MATMUL] + counts[FLOAT_NORM_MATMUL_BIAS] == layers - 1
    assert counts[FLOAT_MATMUL] == 2 * layers + 2
    ops = Counter(_ops(onnx.load(str(fused), load_external_data=False)))
    assert "MatMul" not in ops and "Sigmoid" not in ops
    io = io_signature(plain, cfg, {"eos_token_id": 1})
    prompt = [5, 17, 42, 99, 3, 250, 7]
    reference = OnnxCausalLM(plain, io, threads=1).sequence_logits(prompt)
    assert np.array_equal(OnnxCausalLM(fused, io, threads=1).sequence_logits(prompt), reference)
    if library() is None:
        return
    ours = OnnxCausalLM(fused, io, threads=1, custom_ops=library())
    assert ours.custom_ops_loaded
    mine = ours.sequence_logits(prompt)
    np.testing.assert_allclose(mine, reference, rtol=0, atol=1e-4 * float(np.abs(reference).max()))
    assert np.array_equal(mine.argmax(-1), reference.argmax(-1))


def test_the_bench_sets_a_folded_bias_apart_again_and_the_logits_do_not_change(tmp_path: Path) -> None:
    """bench/edge_decode.py's bias_apart_graph (engine_steps.py --bias-add): each
    SkipRMSNormMatMul*Bias back to the op without the bias and an Add after it, as packages were
    before the fold. The op adds the bias to each output as the Add does, so the logits are the
    same bit for bit, on onnxruntime's kernels (inlined bodies) and on the edge's."""
    import sys

    from edge_agent.runtime.kernels import library

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from edge_decode import bias_apart_graph

    src = _tiny("qwen2", tmp_path / "src", vary_vectors=True)
    cfg = read_hf_config(src)
    graph = quantize_weight_only(
        build_fused(src, cfg, tmp_path / "fused"), tmp_path / "int4" / "model.onnx", 4, 32
    )
    apart = bias_apart_graph(graph)
    assert apart is not None and bias_apart_graph(apart) is None  # nothing folded left in it
    ops = Counter(_ops(onnx.load(str(apart), load_external_data=False)))
    layers = cfg["num_hidden_layers"]
    assert ops[NORM_MATMUL_BIAS] == 0 and ops[NORM_MATMUL] == layers - 1 and ops["Add"] >= layers - 1
    io = io_signature(graph, cfg, {"eos_token_id": 1})
    prompt = [5, 17, 42, 99, 3, 250, 7]
    for lib in (None, library()) if library() is not None else (None,):
        folded = OnnxCausalLM(graph, io, threads=1, custom_ops=lib).sequence_logits(prompt)
        assert np.array_equal(
            OnnxCausalLM(apart, io, threads=1, custom_ops=lib).sequence_logits(prompt), folded
        )
