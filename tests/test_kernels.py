"""The edge's own kernels (edge_agent/runtime/kernels: MatMulNBits, GroupQueryAttention): built by
the install, used where the CPU runs them (AVX2 or AVX-512 VNNI), equal to onnxruntime's ops within
float rounding, and each row's result independent of the rows beside it. On a CPU with AVX-512 both
ops are also tested as an AVX2-only CPU runs them (AUTOGLM_KERNELS_ISA=avx2), and MatMulNBits' two
tiles' outputs are compared bit for bit; on one with AMX, its AMX tile's against the VNNI tile's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from bench.attention_kernels import attention_graph
from cloud.packaging.export import io_signature, read_hf_config
from cloud.packaging.fused import build_fused
from cloud.packaging.nbits_fusion import fuse_layers
from cloud.packaging.quantize import quantize_weight_only
from edge_agent.runtime.kernels import amx as kernel_amx
from edge_agent.runtime.kernels import built, library
from edge_agent.runtime.kernels import isa as kernel_isa
from edge_agent.runtime.kernels import prefetch as kernel_prefetch
from edge_agent.runtime.session import OnnxCausalLM
from edge_agent.settings import RuntimeSettings
from tests.test_export import _tiny

PROMPT = [5, 17, 42, 99, 3, 250, 7, 64, 128, 31]


def _flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _cpu_runs_kernels() -> bool:
    """AVX2 with FMA at least."""
    return {"avx2", "fma"} <= _flags()


def _cpu_has_avx512() -> bool:
    return _cpu_runs_kernels() and {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"} <= _flags()


# The instruction sets the kernels are tested on here: what the CPU has, and AVX2 where it has more.
ISAS = ["native", "avx2"] if _cpu_has_avx512() else ["native"]


@pytest.fixture
def isa(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Caps the library's instruction set for the sessions the test makes (read at registration)."""
    if request.param == "avx2":
        monkeypatch.setenv("AUTOGLM_KERNELS_ISA", "avx2")
        assert kernel_isa() == "avx2", "the cap was not read"
    else:
        monkeypatch.delenv("AUTOGLM_KERNELS_ISA", raising=False)
        assert kernel_isa() == (
            "avx512-vnni" if _cpu_has_avx512() else "avx2" if _cpu_runs_kernels() else None
        )
    return str(request.param)


def _matmul(
    tmp: Path, k: int, n: int, block: int, bits: int, bias: bool, weights: np.ndarray | None = None
) -> bytes:
    """One weight matrix (``weights``, or random ones) as the packager quantizes it; ``bias`` as
    onnxruntime's optimizer fuses a following Add into MatMulNBits (Qwen2's projections)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(k * n + bits)
    if weights is None:
        weights = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])],
        [numpy_helper.from_array(weights, "W")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp / "fp32.onnx"))
    model = onnx.load(str(quantize_weight_only(tmp / "fp32.onnx", tmp / "q" / "model.onnx", bits, block)))
    if bias:
        node = next(x for x in model.graph.node if x.op_type == "MatMulNBits")
        model.graph.initializer.append(
            numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b")
        )
        node.input.extend([""] * (5 - len(node.input)) + ["b"])
    return bytes(model.SerializeToString())


def _exact(model: bytes, x: np.ndarray) -> np.ndarray:
    """What MatMulNBits at accuracy level 4 computes, in float64: activations rounded to int8 per
    weight block (scale max |x| / 127), times the dequantized weights, plus the bias."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_from_string(model).graph
    node = next(x for x in graph.node if x.op_type == "MatMulNBits")
    attrs = {a.name: a.i for a in node.attribute}
    k, n, bits, block = attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    packed, scales = inits[node.input[1]], inits[node.input[2]].reshape(n, -1).astype(np.float64)
    nb = scales.shape[1]
    if bits == 8:
        q = packed.reshape(n, nb * block).astype(np.float64)
    else:  # two elements per byte, the low nibble first
        q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, nb * block).astype(np.float64)
    weights = ((q - 2 ** (bits - 1)) * np.repeat(scales, block, axis=1))[:, :k]
    xq = np.zeros(x.shape, np.float64)
    for b in range(nb):
        seg = x[:, b * block : (b + 1) * block].astype(np.float64)
        scale = np.abs(seg).max(axis=1, keepdims=True).astype(np.float32).astype(np.float64) / 127
        xq[:, b * block : (b + 1) * block] = (
            np.clip(np.rint(seg / np.where(scale > 0, scale, 1)), -127, 127) * scale
        )
    bias = inits[node.input[5]].astype(np.float64) if len(node.input) > 5 and node.input[5] else 0.0
    return np.asarray(xq @ weights.T + bias)


def _session(model: bytes | str, library_path: Path | None) -> ort.InferenceSession:
    """A session of ``model`` (serialized, or the path of a graph with external data)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    if library_path is not None:
        options.register_custom_ops_library(str(library_path))
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def test_the_install_builds_the_library_and_offers_it_where_the_cpu_runs_it() -> None:
    path = built()
    assert path is not None, "pip install did not build edge_agent/runtime/kernels (is gcc there?)"
    assert (library() is not None) == _cpu_runs_kernels()


@pytest.mark.skipif(not _cpu_runs_kernels(), reason="no AVX2: the library registers nothing")
def test_decode_steps_prefetch_by_cpu_vendor_unless_the_environment_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("AUTOGLM_KERNELS_PREFETCH", raising=False)
    vendor = next(
        line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("vendor_id")
    )
    by_vendor = "all" if vendor.endswith("GenuineIntel") else "lone int8 rows"
    assert kernel_prefetch() == by_vendor
    for value, expected in (("0", "none"), ("1", "all")):
        monkeypatch.setenv("AUTOGLM_KERNELS_PREFETCH", value)
        assert kernel_prefetch() == expected
    monkeypatch.setenv("AUTOGLM_KERNELS_PREFETCH", "yes")  # neither: the choice by vendor
    assert kernel_prefetch() == by_vendor


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(
    ("k", "n", "block", "bias"),
    [
        (576, 200, 128, False),  # SmolLM2's K: the last block half full; N not a multiple of 32
        (256, 96, 64, True),  # a fused bias
        (64, 16, 32, False),
        # N not a multiple of 8 (partial stores, a partial bias); K with a last group of 4, which
        # 8-bit weights take and 4-bit ones are refused for (nibbles pack 8 elements per group).
        (580, 203, 64, True),
    ],
)
def test_kernels_equal_onnxruntime_and_rows_do_not_depend_on_their_company(
    bits: int, k: int, n: int, block: int, bias: bool, isa: str, tmp_path: Path
) -> None:
    model = _matmul(tmp_path, k, n, block, bits, bias)
    if library() is None:  # this CPU has no AVX2: nothing is registered, onnxruntime's kernels run
        assert built() is not None
        _session(model, built()).run(None, {"x": np.ones((1, k), np.float32)})
        return
    if bits == 4 and k % 8:
        with pytest.raises(Exception, match="multiple of 8"):
            _session(model, library())
        return
    ours, theirs = _session(model, library()), _session(model, None)
    rng = np.random.default_rng(7)
    for m in (1, 2, 3, 4, 5, 9, 130):
        x = rng.standard_normal((m, k)).astype(np.float32)
        mine, exact = ours.run(None, {"x": x})[0], _exact(model, x)
        # Same int8 activations and int32 sums; only the float accumulation order differs.
        np.testing.assert_allclose(mine, exact, rtol=0, atol=1e-5 * float(np.abs(exact).max()))
        if k % 8 == 0:  # onnxruntime's batched rows are off by ~2e-4 where K ends in a group of 4
            ref = theirs.run(None, {"x": x})[0]
            np.testing.assert_allclose(mine, ref, rtol=0, atol=1e-5 * float(np.abs(ref).max()))
        for i in range(m):
            alone = ours.run(None, {"x": x[i : i + 1]})[0][0]
            assert np.array_equal(alone, mine[i]), f"row {i} of {m} differs from the same row alone"


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 2, 4])
def test_block_sums_at_their_largest_are_exact(bits: int, rows: int, isa: str, tmp_path: Path) -> None:
    """Every weight its format's largest code (nibble 15, byte -128) and every activation +-127:
    the AVX2 tile adds four steps of 4-bit products in 16-bit lanes (4 x 4 x 15 x 127 = 30480)
    and pairs of 8-bit ones (2 x 128 x 127 = 32512) before widening them, the most those lanes
    hold without saturating; a saturated lane would be off by thousands of units here."""
    import onnx
    from onnx import numpy_helper

    k, n, block = 512, 24, 128
    if bits == 8:  # each block's largest magnitude negative: every code 0, a weight of -128
        weights = np.full((k, n), -0.05, np.float32)
    else:  # -0.08 first in each block sets the scale (code 0); the rest, +0.07, are code 15
        weights = np.full((k, n), 0.07, np.float32)
        weights[::block] = -0.08
    model = _matmul(tmp_path, k, n, block, bits, False, weights)
    packed = numpy_helper.to_array(
        next(t for t in onnx.load_from_string(model).graph.initializer if t.name == f"W_Q{bits}")
    )
    want = np.full(packed.shape, 0x00 if bits == 8 else 0xFF, np.uint8)
    if bits == 4:
        want[:, :, 0] = 0xF0  # the block's first element in the low nibble
    assert np.array_equal(packed, want), "the weights are not at their largest codes"
    if library() is None:
        return
    ours = _session(model, library())
    for sign in (1.0, -1.0):
        x = np.full((rows, k), sign, np.float32)
        mine, exact = ours.run(None, {"x": x})[0], _exact(model, x)
        np.testing.assert_allclose(mine, exact, rtol=0, atol=1e-5 * float(np.abs(exact).max()))


def _wide_and_narrow(model: bytes, monkeypatch: pytest.MonkeyPatch) -> tuple[ort.InferenceSession, ...]:
    """Sessions of ``model`` on the library at AVX-512 and capped at AVX2 (on an AVX-512 CPU)."""
    monkeypatch.delenv("AUTOGLM_KERNELS_ISA", raising=False)
    assert kernel_isa() == "avx512-vnni"
    wide = _session(model, library())
    monkeypatch.setenv("AUTOGLM_KERNELS_ISA", "avx2")
    assert kernel_isa() == "avx2"
    return wide, _session(model, library())


@pytest.mark.skipif(not _cpu_has_avx512(), reason="needs a CPU with both tiles (AVX-512 VNNI)")
@pytest.mark.parametrize("bits", [8, 4])
def test_the_avx2_tile_computes_what_the_avx512_tile_does(
    bits: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same int8 activations, exact int32 block sums and the same float steps: an AVX2-only
    machine's answers are those of an AVX-512 one, bit for bit."""
    k = 576 if bits == 4 else 580
    model = _matmul(tmp_path, k, 203, 128, bits, True)
    wide, narrow = _wide_and_narrow(model, monkeypatch)
    x = np.random.default_rng(11).standard_normal((37, k)).astype(np.float32) * 3
    for m in (1, 2, 3, 4, 37):
        assert np.array_equal(wide.run(None, {"x": x[:m]})[0], narrow.run(None, {"x": x[:m]})[0])


@pytest.mark.skipif(not _cpu_has_avx512(), reason="needs a CPU with both tiles (AVX-512 VNNI)")
@pytest.mark.parametrize("floats", [False, True])
def test_the_fused_mlp_is_the_same_on_an_avx2_machine(
    floats: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fused MLP, silu(x gate) x (x up), on the AVX-512 tiles and capped at AVX2: bit for bit
    equal, for gate outputs from tiny to saturating, over column ranges that leave a short tail
    (203 columns), decode- and prefill-sized."""
    k, n = 64, 203
    model = _float_layer(tmp_path, k, n, mlp=True, norm=False) if floats else _layer(tmp_path, k, n, 32, 4)
    wide, narrow = _wide_and_narrow(model, monkeypatch)
    rng = np.random.default_rng(17)
    x = np.concatenate([rng.standard_normal((10, k)) * s for s in (1e-3, 1, 30, 3e3)]).astype(np.float32)
    for m in (1, 3, 4, 40):
        part = {"x": x[:m] if m < 40 else x}
        assert np.array_equal(wide.run(None, part)[0], narrow.run(None, part)[0]), f"{m} rows differ"


@pytest.mark.skipif(not kernel_amx(), reason="needs a CPU with AMX-INT8 that Linux grants the tile state")
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(("k", "block", "bias"), [(576, 128, True), (1024, 256, False), (768, 64, True)])
def test_the_amx_tile_computes_what_the_vnni_tile_does(
    bits: int, k: int, block: int, bias: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Calls of more than 4 rows run on AMX tiles where the CPU has them: the same exact int32
    block sums and float steps as the VNNI tile, so the same bits, in whole tiles of 16 rows and
    in the rest (which runs over zeroed padding rows), past the 128 rows one pass keeps; a row's
    answer is the same alone (VNNI) as in a prefill-sized call (AMX)."""
    model = _matmul(tmp_path, k, 203, block, bits, bias)
    monkeypatch.delenv("AUTOGLM_KERNELS_ISA", raising=False)
    monkeypatch.setenv("AUTOGLM_KERNELS_AMX", "0")
    assert not kernel_amx()
    vnni = _session(model, library())
    monkeypatch.delenv("AUTOGLM_KERNELS_AMX")
    assert kernel_amx()
    tiles = _session(model, library())
    x = np.random.default_rng(13).standard_normal((300, k)).astype(np.float32) * 2
    for m in (5, 15, 16, 17, 33, 70, 128, 129, 300):
        got, want = tiles.run(None, {"x": x[:m]})[0], vnni.run(None, {"x": x[:m]})[0]
        assert np.array_equal(got, want), f"{m} rows differ"
    assert np.array_equal(tiles.run(None, {"x": x[40:41]})[0][0], tiles.run(None, {"x": x})[0][40])


def _layer_fp32(tmp: Path, k: int, n: int, seed: int, mlp: bool, norm: bool, bias: bool = False) -> Path:
    """Part of a decoder layer as the fused decoder writes it (float weights): silu(x·gate) ⊙
    (x·up) if ``mlp``, else x·W (+ a bias Add with ``bias``, as a q/k/v projection's); with ``norm``,
    of the skip-norm of x + skip (outputs y and the sum)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(k + n + seed)
    gate, up = (rng.standard_normal((2, k, n)) * 0.05).astype(np.float32)
    inits = [numpy_helper.from_array(gate, "G"), numpy_helper.from_array(up, "U")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])]
    nodes, a = [], "x"
    if norm:
        gamma = (1 + 0.1 * rng.standard_normal(k)).astype(np.float32)
        inits.append(numpy_helper.from_array(gamma, "gamma"))
        inputs.append(helper.make_tensor_value_info("skip", TensorProto.FLOAT, ["M", k]))
        outputs.append(helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["M", k]))
        nodes.append(
            helper.make_node(
                "SkipSimplifiedLayerNormalization",
                ["x", "skip", "gamma"],
                ["normed", "", "", "sum"],
                domain="com.microsoft",
                epsilon=1e-5,
            )
        )
        a = "normed"
    if mlp:
        nodes += [
            helper.make_node("MatMul", [a, "G"], ["g"]),
            helper.make_node("MatMul", [a, "U"], ["u"]),
            helper.make_node("Sigmoid", ["g"], ["s"]),
            helper.make_node("Mul", ["g", "s"], ["silu"]),
            helper.make_node("Mul", ["silu", "u"], ["y"]),
        ]
    elif bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "bias"))
        nodes += [
            helper.make_node("MatMul", [a, "G"], ["xw"]),
            helper.make_node("Add", ["xw", "bias"], ["y"]),
        ]
    else:
        nodes.append(helper.make_node("MatMul", [a, "G"], ["y"]))
    graph = helper.make_graph(nodes, "layer", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(tmp / "fp32.onnx"))
    return tmp / "fp32.onnx"


NBITS_OPS = {
    (True, False, False): "MatMulNBitsSwiGLU",
    (True, True, False): "SkipRMSNormSwiGLU",
    (False, True, False): "SkipRMSNormMatMulNBits",
    (False, True, True): "SkipRMSNormMatMulNBitsBias",
}


def _layer(
    tmp: Path, k: int, n: int, block: int, bits: int, mlp: bool = True, norm: bool = False, bias: bool = False
) -> bytes:
    """_layer_fp32's graph quantized (which fuses it: nbits_fusion.py)."""
    import onnx

    fp32 = _layer_fp32(tmp, k, n, bits, mlp, norm, bias)
    model = onnx.load(str(quantize_weight_only(fp32, tmp / "q" / "model.onnx", bits, block)))
    op = NBITS_OPS[mlp, norm, bias]
    assert [x.op_type for x in model.graph.node] == [op]
    assert fuse_layers(model)[op] == 1  # and nothing left to fuse again
    return bytes(model.SerializeToString())


def _halves(model: bytes) -> tuple[bytes, bytes]:
    """The fused MLP's gate and up as MatMulNBits graphs of their own (for _exact)."""
    import onnx
    from onnx import helper

    full = onnx.load_from_string(model)
    node = full.graph.node[0]
    out = []
    for weights, scales in ((node.input[1], node.input[2]), (node.input[3], node.input[4])):
        inits = [i for i in full.graph.initializer if i.name in (weights, scales)]
        attrs = {a.name: a.i for a in node.attribute}
        one = helper.make_node("MatMulNBits", ["x", weights, scales], ["y"], domain="com.microsoft", **attrs)
        graph = helper.make_graph([one], "half", list(full.graph.input), list(full.graph.output), inits)
        out.append(bytes(helper.make_model(graph, opset_imports=list(full.opset_import)).SerializeToString()))
    return out[0], out[1]


def _ops_run(model: bytes, library_path: Path, feed: dict[str, np.ndarray], tmp: Path) -> set[str]:
    """The op types onnxruntime's profiler saw run in a session of ``model``."""
    import json

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp / "profile")
    options.register_custom_ops_library(str(library_path))
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    return {e["args"]["op_name"] for e in events if e.get("cat") == "Node" and "op_name" in e.get("args", {})}


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(("k", "n", "block"), [(576, 1536, 128), (64, 200, 32)])
def test_the_fused_mlp_equals_its_function_body_and_rows_do_not_depend_on_their_company(
    bits: int, k: int, n: int, block: int, isa: str, tmp_path: Path
) -> None:
    """MatMulNBitsSwiGLU: the library's op where it is registered; elsewhere onnxruntime inlines
    the function body the packager wrote (two MatMulNBits, Sigmoid, two Muls) — same results."""
    model = _layer(tmp_path, k, n, block, bits)
    theirs = _session(model, None)  # no library: the function is inlined
    rng = np.random.default_rng(3)
    x = rng.standard_normal((9, k)).astype(np.float32)
    gate, up = (_exact(half, x) for half in _halves(model))
    exact = gate / (1 + np.exp(-gate)) * up
    tol = 1e-5 * float(np.abs(exact).max())
    np.testing.assert_allclose(theirs.run(None, {"x": x})[0], exact, rtol=0, atol=tol)
    if library() is None:
        return
    assert "MatMulNBitsSwiGLU" in _ops_run(model, library(), {"x": x}, tmp_path)
    ours = _session(model, library())
    for m in (1, 2, 3, 4, 5, 9):
        mine = ours.run(None, {"x": x[:m]})[0]
        np.testing.assert_allclose(mine, exact[:m], rtol=0, atol=tol)
        for i in range(m):
            alone = ours.run(None, {"x": x[i : i + 1]})[0][0]
            assert np.array_equal(alone, mine[i]), f"row {i} of {m} differs from the same row alone"
    assert ours.run(None, {"x": np.zeros((0, k), np.float32)})[0].shape == (0, n)


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(("mlp", "bias"), [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize(("k", "n", "block"), [(576, 960, 128), (72, 200, 32)])
def test_a_skip_norm_folded_into_the_matmul_after_it_equals_its_function_body(
    mlp: bool, bias: bool, bits: int, k: int, n: int, block: int, isa: str, tmp_path: Path
) -> None:
    """SkipRMSNormMatMulNBits (with the bias Add after it: ...Bias) and SkipRMSNormSwiGLU: the sum
    is x + skip exactly; the output is onnxruntime's (the inlined body) within an activation's int8
    step (the normed values may differ by a float rounding, and one can then round to the next
    step), and each row's result does not depend on the rows beside it."""
    model = _layer(tmp_path, k, n, block, bits, mlp=mlp, norm=True, bias=bias)
    rng = np.random.default_rng(4)
    feed = {
        "x": rng.standard_normal((9, k)).astype(np.float32),
        "skip": rng.standard_normal((9, k)).astype(np.float32),
    }
    theirs = _session(model, None)
    ref, ref_sum = theirs.run(None, feed)
    assert np.array_equal(ref_sum, feed["x"] + feed["skip"])
    if library() is None:
        return
    op = NBITS_OPS[mlp, True, bias]
    assert op in _ops_run(model, library(), feed, tmp_path)
    ours = _session(model, library())
    for m in (1, 3, 4, 9):
        part = {name: v[:m] for name, v in feed.items()}
        mine, mine_sum = ours.run(None, part)
        assert np.array_equal(mine_sum, ref_sum[:m])
        np.testing.assert_allclose(mine, ref[:m], rtol=0, atol=2e-3 * float(np.abs(ref).max()))
        for i in range(m):
            alone = ours.run(None, {name: v[i : i + 1] for name, v in part.items()})[0][0]
            assert np.array_equal(alone, mine[i]), f"row {i} of {m} differs from the same row alone"
    empty = ours.run(None, {name: v[:0] for name, v in feed.items()})
    assert empty[0].shape == (0, n) and empty[1].shape == (0, k)


FLOAT_OPS = {
    (True, False, False): "MatMulFloatSwiGLU",
    (True, True, False): "SkipRMSNormSwiGLUFloat",
    (False, True, False): "SkipRMSNormMatMulFloat",
    (False, True, True): "SkipRMSNormMatMulFloatBias",
    (False, False, False): "MatMulFloat",
}


def _float_layer(tmp: Path, k: int, n: int, mlp: bool, norm: bool, bias: bool = False) -> bytes:
    """_layer_fp32's graph as the packager ships an unquantized model: one float op."""
    import onnx

    model = onnx.load(str(_layer_fp32(tmp, k, n, 32, mlp, norm, bias)))
    assert fuse_layers(model)[FLOAT_OPS[mlp, norm, bias]] == 1
    assert [x.op_type for x in model.graph.node] == [FLOAT_OPS[mlp, norm, bias]]
    return bytes(model.SerializeToString())


def _rank3(model: bytes) -> bytes:
    """``model`` with its inputs and outputs [batch, sequence, features]."""
    import onnx

    proto = onnx.load_from_string(model)
    for value in (*proto.graph.input, *proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        features = dims[-1].dim_value
        del dims[:]
        for d in ("batch", "sequence"):
            dims.add().dim_param = d
        dims.add().dim_value = features
    return bytes(proto.SerializeToString())


def _float_feed(k: int, rows: int, norm: bool, shape: tuple[int, ...] = ()) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(rows + k)
    feed = {"x": rng.standard_normal((*(shape or (rows,)), k)).astype(np.float32)}
    if norm:
        feed["skip"] = rng.standard_normal((*(shape or (rows,)), k)).astype(np.float32)
    return feed


@pytest.mark.skipif(not _cpu_runs_kernels(), reason="no AVX2: the library registers nothing")
@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize(("mlp", "norm", "bias"), list(FLOAT_OPS))
@pytest.mark.parametrize(("k", "n"), [(576, 1536), (300, 200), (8, 17)])
def test_the_float_ops_equal_their_function_bodies_and_rows_do_not_depend_on_their_company(
    mlp: bool, norm: bool, bias: bool, k: int, n: int, isa: str, tmp_path: Path
) -> None:
    """MatMulFloat and its fused forms (an fp32 graph's matmuls): onnxruntime's inlined body within
    float rounding, the sum x + skip exactly, and each row's result the same whatever the rows
    beside it (decode-sized calls and prefills, which run K in blocks of 512: a bias is added once,
    after the last)."""
    model = _float_layer(tmp_path, k, n, mlp, norm, bias)
    assert FLOAT_OPS[mlp, norm, bias] in _ops_run(model, library(), _float_feed(k, 3, norm), tmp_path)
    theirs, ours = _session(model, None), _session(model, library())
    for m in (1, 2, 3, 4, 5, 9, 37):
        feed = _float_feed(k, m, norm)
        ref, mine = theirs.run(None, feed), ours.run(None, feed)
        np.testing.assert_allclose(mine[0], ref[0], rtol=0, atol=1e-5 * max(1.0, float(np.abs(ref[0]).max())))
        if norm:
            assert np.array_equal(mine[1], feed["x"] + feed["skip"])
        for i in (0, m // 2, m - 1):
            alone = ours.run(None, {name: v[i : i + 1] for name, v in feed.items()})[0][0]
            assert np.array_equal(alone, mine[0][i]), f"row {i} of {m} differs from the same row alone"
    # [batch, sequence, K], as the decoder calls it
    batched = _float_feed(k, 0, norm, shape=(2, 3))
    ranked = _session(_rank3(model), library()).run(None, batched)
    assert ranked[0].shape == (2, 3, n)
    assert np.array_equal(
        ranked[0].reshape(6, n), ours.run(None, {x: v.reshape(6, k) for x, v in batched.items()})[0]
    )
    empty = ours.run(None, _float_feed(k, 0, norm))
    assert empty[0].shape == (0, n) and (not norm or empty[1].shape == (0, k))


@pytest.mark.skipif(not _cpu_has_avx512(), reason="needs a CPU with both tiles (AVX-512)")
@pytest.mark.parametrize(("k", "n"), [(576, 960), (300, 200)])
def test_the_float_avx2_tile_computes_what_the_avx512_tile_does(
    k: int, n: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both tiles sum each output as one chain of fused multiply-adds over k: bit for bit equal."""
    model = _float_layer(tmp_path, k, n, mlp=False, norm=False)
    feed = _float_feed(k, 37, norm=False)
    wide, narrow = _wide_and_narrow(model, monkeypatch)
    for m in (1, 4, 37):
        part = {"x": feed["x"][:m]}
        assert np.array_equal(wide.run(None, part)[0], narrow.run(None, part)[0]), f"{m} rows differ"


def test_a_float_matmul_whose_weights_are_not_constant_is_left_to_onnxruntime(tmp_path: Path) -> None:
    """Only a MatMul by a constant float matrix becomes MatMulFloat (the op packs it once)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "two inputs",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", 8]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [8, 4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert not any(fuse_layers(model).values())
    assert [x.op_type for x in model.graph.node] == ["MatMul"]
    onnx.checker.check_model(model)
    # An initializer that is also a graph input (a default the caller may override): the same.
    model.graph.initializer.append(numpy_helper.from_array(np.ones((8, 4), np.float32), "w"))
    assert not any(fuse_layers(model).values())
    del model.graph.input[1]  # a constant now
    assert fuse_layers(model)["MatMulFloat"] == 1


def test_silu_is_right_across_the_float_range(tmp_path: Path) -> None:
    """The fused MLP's own e^x (no libm): tiny, large and saturating gate outputs."""
    model = _layer(tmp_path, 64, 64, 32, 8)
    ours, theirs = _session(model, library() or built()), _session(model, None)
    x = np.concatenate([np.random.default_rng(5).standard_normal((6, 64)) * s for s in (1e-3, 1, 30, 3e3)])
    x = x.astype(np.float32)
    mine, ref = ours.run(None, {"x": x})[0], theirs.run(None, {"x": x})[0]
    assert np.isfinite(mine).all()
    np.testing.assert_allclose(mine, ref, rtol=2e-5, atol=1e-6 * float(np.abs(ref).max()))


def _resident_kib(path: Path) -> int:
    """This process's resident KiB of mappings of ``path``."""
    total, current = 0, ""
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:
            current = fields[5] if len(fields) > 5 else ""
        elif fields and fields[0] == "Rss:" and current == str(path):
            total += int(fields[1])
    return total


@pytest.mark.skipif(not _cpu_runs_kernels(), reason="no AVX2: the library registers nothing (see above)")
def test_weights_mapped_from_external_data_are_resident_once(tmp_path: Path) -> None:
    """onnxruntime maps a graph's external-data file; the kernels copy the weights into their
    packed layout and hand the mapped pages back, so the weights are not resident twice."""
    import onnx

    k = n = 1536  # 2.25 MiB of int8 weights: mapped, not copied, by onnxruntime
    inline = _matmul(tmp_path, k, n, 128, 8, False)
    model = onnx.load_from_string(inline)
    onnx.save(
        model, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="ext.data", size_threshold=0
    )
    data = (tmp_path / "ext.data").resolve()
    ours = _session(str(tmp_path / "ext.onnx"), library())
    assert _resident_kib(data) < k * n // 1024 // 4, "the mapped weights stayed resident"
    x = np.random.default_rng(3).standard_normal((3, k)).astype(np.float32)
    ref = _session(inline, None).run(None, {"x": x})[0]
    np.testing.assert_allclose(ours.run(None, {"x": x})[0], ref, rtol=0, atol=1e-5 * float(np.abs(ref).max()))


def _anonymous_kib() -> tuple[int, int]:
    """This process's resident anonymous KiB, and how much of it is in transparent huge pages."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:])
    return int(fields["Anonymous"].split()[0]), int(fields["AnonHugePages"].split()[0])


@pytest.mark.skipif(not _cpu_runs_kernels(), reason="no AVX2: the library registers nothing (see above)")
def test_packed_weights_are_freed_with_their_session(tmp_path: Path) -> None:
    """The packed panels come from huge-page chunks (arena.c): a chunk is unmapped when its last
    kernel goes, so sessions made and dropped in turn (a model update) do not pile up memory."""
    import ctypes
    import gc

    # glibc raises its mmap threshold after a large free and then keeps such blocks in its heap:
    # a fixed threshold keeps onnxruntime's own copies from settling there mid-test.
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD (fixing it also fixes the trim threshold)
    model = _matmul(tmp_path, 2048, 4096, 128, 8, False)  # 8 MiB of packed int8 weights
    x = np.ones((1, 2048), np.float32)
    held = []  # resident anonymous KiB after each session came and went
    for _ in range(8):
        session = _session(model, library())
        session.run(None, {"x": x})
        loaded, _ = _anonymous_kib()
        del session
        gc.collect()
        held.append(_anonymous_kib()[0])
        assert loaded - held[-1] > 6 * 1024, "the packed weights were not resident while loaded, or stayed"
    # The first rounds settle the allocators' own caches (glibc keeps some freed memory).
    assert held[-1] - held[2] < 2 * 1024, f"memory grew by session: {held}"


def test_a_graph_with_zero_points_is_refused(tmp_path: Path) -> None:
    """Zero points (which our packager never emits) are not taken: the session fails, and
    OnnxCausalLM loads the graph on onnxruntime's kernels (tests/test_fused_arches.py)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(_matmul(tmp_path, 128, 32, 64, 8, False))
    node = next(x for x in model.graph.node if x.op_type == "MatMulNBits")
    model.graph.initializer.append(numpy_helper.from_array(np.full(32 * 2, 128, np.uint8), "zp"))
    node.input.append("zp")
    assert built() is not None
    if library() is None:  # no AVX2: nothing registered, nothing to refuse
        _session(model.SerializeToString(), built())
        return
    with pytest.raises(Exception, match="zero points"):
        _session(model.SerializeToString(), built())


@pytest.mark.parametrize("floats", [False, True])
def test_a_bias_the_fused_op_does_not_take_is_refused(floats: bool, tmp_path: Path) -> None:
    """A norm-matmul op's bias must be a constant vector of N floats: one of shape [1, N] (which the
    function body's Add would broadcast alike) fails the session with the library, as zero points
    do, and onnxruntime's inlined body still runs it."""
    import onnx
    from onnx import numpy_helper

    k, n = 64, 48
    if floats:
        model = onnx.load_from_string(_float_layer(tmp_path, k, n, False, True, bias=True))
    else:
        model = onnx.load_from_string(_layer(tmp_path, k, n, 32, 8, mlp=False, norm=True, bias=True))
    bias = next(x for x in model.graph.initializer if x.name == "bias")
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias).reshape(1, n), "bias"))
    feed = _float_feed(k, 2, norm=True)
    assert _session(model.SerializeToString(), None).run(None, feed)[0].shape == (2, n)
    if library() is None:
        return
    with pytest.raises(Exception, match="bias must be N constant floats"):
        _session(model.SerializeToString(), library())


def test_a_quantized_model_decodes_alike_with_either_kernels(tmp_path: Path) -> None:
    src = _tiny("llama", tmp_path / "src", vary_vectors=True)
    cfg = read_hf_config(src)
    graph = quantize_weight_only(
        build_fused(src, cfg, tmp_path / "fused"), tmp_path / "int8" / "model.onnx", 8, 64
    )
    io = io_signature(graph, cfg, {"eos_token_id": 1})
    ours = OnnxCausalLM(graph, io, threads=2, custom_ops=library() or built())
    theirs = OnnxCausalLM(graph, io, threads=2)
    assert ours.custom_ops_loaded == (library() is not None)
    a, b = ours.sequence_logits(PROMPT), theirs.sequence_logits(PROMPT)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * float(np.abs(b).max()))
    assert np.array_equal(a.argmax(-1), b.argmax(-1))


def test_the_setting_chooses_the_library() -> None:
    assert RuntimeSettings().kernel_library() == library()
    assert RuntimeSettings(kernels="onnxruntime").kernel_library() is None


class _Attention:
    """Runs an attention graph over one KV buffer bound as both past and present, as the edge does."""

    def __init__(
        self,
        session: ort.InferenceSession,
        batch: int,
        kv_heads: int,
        cache: int,
        head: int,
        dtype: type = np.float32,
    ) -> None:
        self.session = session
        self.kv = [np.zeros((batch, kv_heads, cache, head), dtype) for _ in range(2)]

    def run(self, feeds: dict[str, np.ndarray], seqlens: list[int], total: int) -> np.ndarray:
        binding = self.session.io_binding()
        binding.bind_output("out")  # first: get_outputs()[0]
        rows = len(seqlens)
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        binding.bind_cpu_input("seqlens_k", np.asarray(seqlens, np.int32))
        binding.bind_cpu_input("total", np.asarray(total, np.int32))
        for (past, present), array in zip((("pk", "present_k"), ("pv", "present_v")), self.kv, strict=True):
            value = ort.OrtValue.ortvalue_from_numpy(array[:rows])
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        self.session.run_with_iobinding(binding)
        return np.asarray(binding.get_outputs()[0].numpy())


def _qkv(rng: np.random.Generator, rows: int, seq: int, widths: list[int]) -> list[np.ndarray]:
    return [rng.standard_normal((rows, seq, w)).astype(np.float32) for w in widths]


@pytest.mark.skipif(not _cpu_runs_kernels(), reason="no AVX2: the library registers nothing")
@pytest.mark.parametrize("isa", ISAS, indirect=True)
# A half-precision cache (GroupQueryAttentionHalfKV, cloud/packaging/half_kv.py) against the
# function's body as onnxruntime inlines it without the library (float16 GroupQueryAttention):
# theirs rounds the query and computes in half, ours rounds only the cache, hence the looser bound.
@pytest.mark.parametrize("kv", ["float32", "float16"])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head", "packed", "rot", "interleaved", "window"),
    [
        (9, 3, 64, True, 32, False, -1),  # SmolLM2: packed QKV, whole-head rotary
        (14, 2, 64, True, 32, False, -1),  # Qwen2-0.5B's grouping
        # One KV head (multi-query): a lone row's heads split over tasks where the CPUs outnumber
        # sequences x KV heads, three rows' not; a row's output is the same either way.
        (8, 1, 64, True, 32, False, -1),
        # Separate Q, K, V (QK-norm graphs); GLM's partial interleaved rotary.
        (4, 4, 128, False, 32, True, -1),
        (6, 2, 80, False, 0, False, 5),  # no rotary, a head of 64 + 16 columns, a local window
    ],
)
def test_attention_equals_onnxruntime_and_rows_do_not_depend_on_their_company(
    heads: int,
    kv_heads: int,
    head: int,
    packed: bool,
    rot: int,
    interleaved: bool,
    window: int,
    kv: str,
    isa: str,
) -> None:
    cache, half = 96, kv == "float16"
    model = attention_graph(heads, kv_heads, head, packed, rot, interleaved, window, cache, half_kv=half)
    widths = [(heads + 2 * kv_heads) * head] if packed else [heads * head, kv_heads * head, kv_heads * head]
    names = ["q"] if packed else ["q", "k", "v"]
    dtype = np.float16 if half else np.float32
    ours = _Attention(_session(model, library()), 3, kv_heads, cache, head, dtype)
    theirs = _Attention(_session(model, None), 3, kv_heads, cache, head, dtype)
    out_tol, kv_tol = (4e-3, 8e-3) if half else (2e-5, 1e-5)
    rng = np.random.default_rng(heads * head + rot)

    def both(seq: int, seqlens: list[int], total: int, rows: int) -> None:
        feeds = dict(zip(names, _qkv(rng, rows, seq, widths), strict=True))
        mine, ref = ours.run(feeds, seqlens, total), theirs.run(feeds, seqlens, total)
        np.testing.assert_allclose(mine, ref, rtol=0, atol=out_tol * float(np.abs(ref).max()))
        for a, b in zip(ours.kv, theirs.kv, strict=True):
            np.testing.assert_allclose(a[:rows], b[:rows], rtol=0, atol=kv_tol)

    both(37, [36], 37, 1)  # a first prompt: two blocks of query rows
    both(11, [47], 48, 1)  # a later prompt continuing the cached 37 positions (the prefix cache)
    for step in range(3):  # decode steps
        both(1, [48 + step], 49 + step, 1)
    # Three sequences at different positions in one step (parallel slots): rows 1 and 2 start
    # from copies of row 0's cache, each then as long as its own seqlens_k says.
    for kv in ours.kv + theirs.kv:
        kv[1:] = kv[0]
    both(1, [51, 20, 40], 52, 3)
    both(1, [52, 21, 41], 53, 3)
    # A row's output is the same alone as beside others.
    feeds = dict(zip(names, _qkv(rng, 3, 1, widths), strict=True))
    saved = [kv.copy() for kv in ours.kv]
    together = ours.run(feeds, [53, 22, 42], 54)
    for r, seqlen in enumerate([53, 22, 42]):
        for kv, keep in zip(ours.kv, saved, strict=True):
            kv[:] = keep
        ours.kv = [kv[r : r + 1] for kv in ours.kv]
        alone = ours.run({n: a[r : r + 1] for n, a in feeds.items()}, [seqlen], seqlen + 1)
        ours.kv = [keep.copy() for keep in saved]
        assert np.array_equal(alone[0], together[r]), f"row {r} differs alone"
    # Prompt pieces of 6 rows continuing three caches of different lengths in one call (the
    # parallel slots read newcomers' prompts together; onnxruntime's kernel takes such a piece for
    # one sequence at a time): each row's output and keys are what it computes alone, and those
    # are onnxruntime's.
    feeds = dict(zip(names, _qkv(rng, 3, 6, widths), strict=True))
    cached = [40, 0, 25]
    saved = [a.copy() for a in ours.kv]
    together = ours.run(feeds, [n + 5 for n in cached], max(cached) + 6)
    after = [a.copy() for a in ours.kv]
    for r, n in enumerate(cached):
        ours.kv = [keep[r : r + 1].copy() for keep in saved]
        theirs.kv = [keep[r : r + 1].copy() for keep in saved]
        one = {name: a[r : r + 1] for name, a in feeds.items()}
        alone, ref = ours.run(one, [n + 5], n + 6), theirs.run(one, [n + 5], n + 6)
        assert np.array_equal(alone[0], together[r]), f"row {r} differs alone"
        np.testing.assert_allclose(alone, ref, rtol=0, atol=out_tol * float(np.abs(ref).max()))
        for mine, both_rows in zip(ours.kv, after, strict=True):
            assert np.array_equal(mine[0, :, : n + 6], both_rows[r, :, : n + 6])


@pytest.mark.skipif(not _cpu_runs_kernels(), reason="no AVX2: the library registers nothing")
@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("kv", ["float32", "float16"])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head", "window"),
    [(9, 3, 64, -1), (14, 2, 64, -1), (8, 1, 64, -1), (6, 2, 80, 5)],
)
def test_a_prompt_computes_every_position_as_decode_steps_do(
    heads: int, kv_heads: int, head: int, window: int, kv: str, isa: str
) -> None:
    """The prefix cache serves a conversation's next turn from positions that decode steps
    computed, and feeds a repeated prompt's last token alone: a position's output and its keys
    and values are the same bits whether it is read in a prompt, in a shorter piece continuing
    a cache, or alone in a decode step (a prompt once summed its scores in another order:
    SmolLM2's greedy answers then changed with the cache)."""
    cache, half, n = 96, kv == "float16", 40
    dtype = np.float16 if half else np.float32
    session = _session(
        attention_graph(heads, kv_heads, head, True, 32, False, window, cache, half_kv=half), library()
    )
    q = np.random.default_rng(heads * head).standard_normal((1, n, (heads + 2 * kv_heads) * head))
    q = q.astype(np.float32)
    whole = _Attention(session, 1, kv_heads, cache, head, dtype)
    expected = whole.run({"q": q}, [n - 1], n)[0]
    pieces = _Attention(session, 1, kv_heads, cache, head, dtype)
    # A prompt of 17, six decode steps, a piece of 9 continuing the cache, then steps to the end.
    bounds = [(0, 17), *((p, p + 1) for p in range(17, 23)), (23, 32), *((p, p + 1) for p in range(32, n))]
    for lo, hi in bounds:
        out = pieces.run({"q": q[:, lo:hi]}, [hi - 1], hi)[0]
        assert np.array_equal(out, expected[lo:hi]), f"positions {lo}-{hi - 1} differ"
    for mine, ref in zip(pieces.kv, whole.kv, strict=True):
        assert np.array_equal(mine[:, :, :n], ref[:, :, :n])


@pytest.mark.skipif(not _cpu_runs_kernels(), reason="no AVX2: the library registers nothing")
@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("kv", ["float32", "float16"])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "window"),
    [
        (9, 3, -1),  # SmolLM2's grouping
        (8, 1, -1),  # one KV head: a lone row's heads split over tasks
        (6, 2, 300),  # a local window shorter than the longest rows
    ],
)
def test_a_long_decode_step_equals_onnxruntime_and_alone(
    heads: int, kv_heads: int, window: int, kv: str, isa: str
) -> None:
    """Decode steps of rows hundreds of keys long and of different lengths: the output is
    onnxruntime's, and a row's is the same alone as beside the others."""
    head, cache, half = 64, 800, kv == "float16"
    dtype = np.float16 if half else np.float32
    model = attention_graph(heads, kv_heads, head, True, 32, False, window, cache, half_kv=half)
    width = (heads + 2 * kv_heads) * head
    ours = _Attention(_session(model, library()), 4, kv_heads, cache, head, dtype)
    theirs = _Attention(_session(model, None), 4, kv_heads, cache, head, dtype)
    rng = np.random.default_rng(heads + window)
    # A cache as a long prompt leaves it (the keys' scale makes some scores stand out, as trained
    # models' do).
    for mine, ref, scale in zip(ours.kv, theirs.kv, (3.0, 1.0), strict=True):
        mine[:] = (scale * rng.standard_normal(mine.shape)).astype(dtype)
        ref[:] = mine
    seqlens = [700, 255, 300, 512]
    out_tol, kv_tol = (4e-3, 8e-3) if half else (2e-5, 1e-5)
    for step in range(2):
        now = [n + step for n in seqlens]
        feeds = {"q": rng.standard_normal((4, 1, width)).astype(np.float32)}
        saved = [a.copy() for a in ours.kv]
        together = ours.run(feeds, now, max(now) + 1)
        ref = theirs.run(feeds, now, max(now) + 1)
        np.testing.assert_allclose(together, ref, rtol=0, atol=out_tol * float(np.abs(ref).max()))
        for a, b in zip(ours.kv, theirs.kv, strict=True):  # the new keys rotated and written alike
            np.testing.assert_allclose(a, b, rtol=0, atol=kv_tol)
        after = [a.copy() for a in ours.kv]
        for r, seqlen in enumerate(now):
            ours.kv = [keep[r : r + 1].copy() for keep in saved]
            alone = ours.run({"q": feeds["q"][r : r + 1]}, [seqlen], seqlen + 1)
            assert np.array_equal(alone[0], together[r]), f"row {r} differs alone"
        ours.kv = after


def _unshared_feeds(seed: int, kv: type) -> dict[str, np.ndarray]:
    """A decode step of two sequences (SmolLM2's heads) over past tensors of type ``kv``."""
    rng = np.random.default_rng(seed)
    return {
        "q": rng.standard_normal((2, 1, 15 * 64)).astype(np.float32),
        "pk": rng.standard_normal((2, 3, 40, 64)).astype(kv),
        "pv": rng.standard_normal((2, 3, 40, 64)).astype(kv),
        "seqlens_k": np.asarray([30, 12], np.int32),
        "total": np.asarray(31, np.int32),
    }


@pytest.mark.skipif(not _cpu_runs_kernels(), reason="no AVX2: the library registers nothing")
def test_a_half_kv_cache_runs_the_librarys_op_and_elsewhere_its_function_body(tmp_path: Path) -> None:
    """With the library, GroupQueryAttentionHalfKV is one node of ours (no Casts); without it,
    onnxruntime inlines the body: Casts around its own float16 GroupQueryAttention."""
    model = attention_graph(9, 3, 64, True, 32, False, -1, 64, half_kv=True)
    feed = _unshared_feeds(7, np.float16)
    lib = library()
    assert lib is not None
    assert _ops_run(model, lib, feed, tmp_path) == {"GroupQueryAttentionHalfKV"}
    session = _session(model, None)
    assert {i.type for i in session.get_inputs() if i.name in ("pk", "pv")} == {"tensor(float16)"}
    out, present_k, _ = session.run(None, feed)
    assert out.dtype == np.float32 and present_k.dtype == np.float16
    mine = _session(model, lib).run(None, feed)
    np.testing.assert_allclose(mine[0], out, rtol=0, atol=4e-3 * float(np.abs(out).max()))


@pytest.mark.skipif(not _cpu_runs_kernels(), reason="no AVX2: the library registers nothing")
@pytest.mark.parametrize("isa", ISAS, indirect=True)
def test_attention_without_a_shared_buffer_copies_the_past(isa: str) -> None:
    """Past and present as separate tensors (no IO binding): the present holds the past, then the
    new positions, then zeros, as onnxruntime's kernel leaves it."""
    model = attention_graph(9, 3, 64, True, 32, False, -1, 64)
    feeds = _unshared_feeds(5, np.float32)
    mine = _session(model, library()).run(None, feeds)
    ref = _session(model, None).run(None, feeds)
    for a, b in zip(mine, ref, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * float(np.abs(b).max()))


def test_attention_with_softcap_is_refused() -> None:
    import onnx
    from onnx import helper

    model = onnx.load_from_string(attention_graph(4, 2, 64, True, 32, False, -1, 32))
    model.graph.node[0].attribute.append(helper.make_attribute("softcap", 30.0))
    if library() is None:  # no AVX2: nothing registered, onnxruntime's kernel takes softcap
        _session(model.SerializeToString(), built())
        return
    with pytest.raises(Exception, match="softcap"):
        _session(model.SerializeToString(), built())
