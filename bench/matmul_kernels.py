"""Where the quantized prefill and parallel steps lose: one projection timed alone in ONNX Runtime.

A decode step multiplies 1 row of activations by each weight matrix; parallel slots multiply 2-4
rows; a prefill, hundreds. This times one matrix of a model's shape (``--k`` × ``--n``; default
SmolLM2's MLP up-projection, 576 × 1536) at ``--rows`` rows with every kernel the edge could use:

- fp32 ``MatMul`` (MLAS SGEMM);
- ``MatMulNBits`` int8 and int4, blocks of 128, symmetric, ``accuracy_level`` 4 (activations
  quantized to int8 per block: what the packager ships) and 0 (float compute: the weights are
  dequantized for every call);
- where this CPU runs them (AVX-512 VNNI or AVX2; ``AUTOGLM_KERNELS_ISA=avx2`` picks the AVX2 tile
  on an AVX-512 CPU), the edge's own MatMulNBits kernels (edge_agent.runtime.kernels) on the same
  int8 and int4 graphs;
- ``quantize_dynamic``'s int8 (``DynamicQuantizeLinear`` + ``MatMulInteger``, per-channel weights,
  one activation scale per call: MLAS QGEMM u8s8).

Usage: python bench/matmul_kernels.py [--k 576] [--n 1536] [--rows 1 2 4 512] [--threads 2] [--reps 30]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from typing import Any

import numpy as np


def fp32_model(k: int, n: int, weights: np.ndarray) -> Any:
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "one",
        [x],
        [y],
        [numpy_helper.from_array(weights, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def nbits_model(k: int, n: int, weights: np.ndarray, bits: int, level: int) -> Any:
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    config = DefaultWeightOnlyQuantConfig(
        block_size=128, is_symmetric=True, accuracy_level=level, bits=bits, quant_format=QuantFormat.QOperator
    )
    quantizer = MatMulNBitsQuantizer(fp32_model(k, n, weights), algo_config=config)
    quantizer.process()
    return quantizer.model.model


def dynamic_model(k: int, n: int, weights: np.ndarray) -> Any:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(fp32_model(k, n, weights), f"{tmp}/a.onnx")
        quantize_dynamic(f"{tmp}/a.onnx", f"{tmp}/b.onnx", weight_type=QuantType.QInt8, per_channel=True)
        return onnx.load(f"{tmp}/b.onnx")


def time_model(
    model: Any, k: int, rows: list[int], threads: int, reps: int, custom_ops: str | None = None
) -> dict[int, float]:
    """Median milliseconds per call at each row count."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if custom_ops:
        options.register_custom_ops_library(custom_ops)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(1)
    out: dict[int, float] = {}
    for m in rows:
        x = rng.standard_normal((m, k)).astype(np.float32)
        for _ in range(3):
            session.run(None, {"x": x})
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            session.run(None, {"x": x})
            times.append(time.perf_counter() - t0)
        out[m] = statistics.median(times) * 1000
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, default=576)
    ap.add_argument("--n", type=int, default=1536)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 512])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    import logging

    import onnxruntime as ort

    logging.disable(logging.WARNING)
    weights = (np.random.default_rng(0).standard_normal((args.k, args.n)) * 0.02).astype(np.float32)
    kernels = [
        ("fp32 MatMul", fp32_model(args.k, args.n, weights)),
        ("int8 MatMulNBits level 4", nbits_model(args.k, args.n, weights, 8, 4)),
        ("int8 MatMulNBits level 0", nbits_model(args.k, args.n, weights, 8, 0)),
        ("int4 MatMulNBits level 4", nbits_model(args.k, args.n, weights, 4, 4)),
        ("int4 MatMulNBits level 0", nbits_model(args.k, args.n, weights, 4, 0)),
        ("int8 dynamic (MatMulInteger)", dynamic_model(args.k, args.n, weights)),
    ]
    from edge_agent.runtime.kernels import isa, library

    ours = library()  # the edge's MatMulNBits kernels, where this CPU runs them
    timed: list[tuple[str, Any, str | None]] = [(label, model, None) for label, model in kernels]
    if ours:
        timed += [
            (f"{label.split(' level')[0]}, our kernel ({isa()})", model, str(ours))
            for label, model in kernels[1:4:2]
        ]
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, onnxruntime {ort.__version__}, "
        f"{args.threads} threads; one {args.k} x {args.n} matrix; median ms per call of {args.reps}"
    )
    print()
    print(
        "| kernel | " + " | ".join(f"{m} row{'s' if m > 1 else ''}" for m in args.rows) + " | per row at "
        f"{args.rows[-1]} vs 1 |"
    )
    print("|---|" + "---:|" * (len(args.rows) + 1))
    for label, model, library_path in timed:
        ms = time_model(model, args.k, args.rows, args.threads, args.reps, library_path)
        cells = " | ".join(f"{ms[m]:.3f}" for m in args.rows)
        last = args.rows[-1]
        print(f"| {label} | {cells} | {ms[last] / last / ms[args.rows[0]]:.3f} |")
    print()
    print(f"GFLOP per call at {args.rows[-1]} rows: {2 * args.rows[-1] * args.k * args.n / 1e9:.2f}")


if __name__ == "__main__":
    main()
