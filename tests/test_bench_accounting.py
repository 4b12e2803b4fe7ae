"""The benches' count of the bytes a decode step reads (bench/edge_decode.py), which every
ceiling share in bench/RESULTS.md divides by: rows padded to whole blocks, embedding tables and
rotary caches are not read whole, and must not inflate what the kernels are credited with."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from edge_decode import weight_bytes_per_token


def _graph(path: Path, k: int, n: int, bits: int, block: int) -> None:
    nb = -(-k // block)
    blob = block * bits // 8
    inits = [
        numpy_helper.from_array(np.zeros((n, nb, blob), np.uint8), "w_q"),
        numpy_helper.from_array(np.ones(n * nb, np.float32), "w_scales"),
        numpy_helper.from_array(np.ones((1000, k), np.float32), "embed"),
        numpy_helper.from_array(np.ones((4096, 32), np.float32), "cos"),
        numpy_helper.from_array(np.ones((4096, 32), np.float32), "sin"),
        numpy_helper.from_array(np.ones(k, np.float32), "gamma"),
    ]
    nodes = [
        helper.make_node("Gather", ["embed", "ids"], ["x"]),
        helper.make_node(
            "MatMulNBits",
            ["x", "w_q", "w_scales"],
            ["y"],
            domain="com.microsoft",
            K=k,
            N=n,
            bits=bits,
            block_size=block,
        ),
        helper.make_node(
            "GroupQueryAttention",
            ["y", "", "", "pk", "pv", "lens", "total", "cos", "sin"],
            ["o", "pk_out", "pv_out"],
            domain="com.microsoft",
        ),
        helper.make_node("Mul", ["o", "gamma"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        initializer=inits,
    )
    onnx.save_model(helper.make_model(graph), str(path))


def test_a_decode_step_reads_unpadded_rows_and_no_whole_tables(tmp_path: Path) -> None:
    # SmolLM2's hidden size: 576 = 4.5 blocks of 128, stored as 5 (640 bytes a row at 8 bits).
    for bits in (8, 4):
        path = tmp_path / f"g{bits}.onnx"
        _graph(path, k=576, n=960, bits=bits, block=128)
        weights = 960 * 576 * bits // 8  # as the kernels pack them, not 960 x 640 x bits / 8
        scales = 960 * 5 * 4
        gamma = 576 * 4
        assert weight_bytes_per_token(path) == weights + scales + gamma


def test_whole_blocks_count_as_stored(tmp_path: Path) -> None:
    path = tmp_path / "g.onnx"
    _graph(path, k=768, n=256, bits=4, block=128)
    assert weight_bytes_per_token(path) == 256 * 768 // 2 + 256 * 6 * 4 + 768 * 4


def test_read_probe_reads_every_word() -> None:
    """The read-only probe the ceiling shares are set against (bench/read_probe.c, built here with
    the C compiler the kernels' build needs) must read the whole array, not a part of it that a
    compiler or a short loop bound left out: its XOR equals numpy's over the same words."""
    import edge_decode

    probe = edge_decode._read_probe()
    assert probe is not None, "cc could not build bench/read_probe.c"
    rng = np.random.default_rng(7)
    words = rng.integers(0, 2**63, size=3 * 64 * 1024, dtype=np.uint64)
    assert probe(words.ctypes.data, words.nbytes) == int(np.bitwise_xor.reduce(words))
    words[-1] ^= np.uint64(1)  # the last word counts too
    assert probe(words.ctypes.data, words.nbytes) == int(np.bitwise_xor.reduce(words))
    # At any 8-byte offset (it loads whole cache lines as vectors, which must not assume alignment)
    for skip in (1, 3, 7):
        part = words[skip : skip + 64 * 1024]
        assert probe(part.ctypes.data, part.nbytes) == int(np.bitwise_xor.reduce(part))
    rate, best = edge_decode.read_bandwidth(1, mib=64, repeats=2)
    assert 0 < rate <= best


def test_fma_peak_probe_runs_its_chains() -> None:
    """The float32 peak the prefill rates are set against (bench/fma_peak.c) must run every step
    it is counted for: its result equals the same twelve chains stepped here (one rounding per
    fused multiply-add, as the FMA does: exact in float64, then rounded once to float32)."""
    import edge_decode

    chains = edge_decode._fma_chains()
    assert chains is not None, "cc could not build bench/fma_peak.c"
    for steps in (0, 1, 37, 1000):
        acc = [np.float32(c) for c in range(12)]
        m, a = np.float32(0.9999999), np.float32(1e-7)
        for _ in range(steps):
            acc = [np.float32(np.float64(x) * np.float64(m) + np.float64(a)) for x in acc]
        total = acc[0]
        for x in acc[1:]:
            total = np.float32(total + x)
        assert chains(steps) == total
    peak = edge_decode.fma_peak(1, steps=1_000_000, repeats=2)
    assert peak is not None and 0 < peak[0] <= peak[1]
