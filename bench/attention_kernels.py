"""The attention alone: one GroupQueryAttention node timed in ONNX Runtime, ours beside its own.

A decode step runs one GroupQueryAttention per layer over the KV cache the edge binds as both
past and present; parallel slots run it for 2-4 sequences at once; a prefill for the whole prompt.
This times one node of a model's shape (``--shape``: SmolLM2-135M's 9 heads over 3 KV heads of 64,
or Qwen2-0.5B's 14 over 2) with:

- onnxruntime's own kernel (``runtime.kernels: onnxruntime``);
- where this CPU runs them (AVX-512 VNNI or AVX2; ``AUTOGLM_KERNELS_ISA=avx2`` picks the AVX2
  routines on an AVX-512 CPU), the edge's own (edge_agent/runtime/kernels), the same
  node in the same graph;

for decode steps of 1 and 4 rows at several cache positions (``--positions``) and a first
prompt of ``--prompt`` rows; ours also over a float16 KV cache (the node as the packager writes
it with ``--kv-cache float16``: cloud/packaging/half_kv.py). Microseconds per call (median of ``--reps``), with the run's own
overhead, as a graph of one node pays it.

Usage: python bench/attention_kernels.py [--shape smollm2|qwen2-0.5b] [--positions 128 512 2048]
       [--prompt 512] [--threads 2] [--reps 200]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {"smollm2": (9, 3, 64), "qwen2-0.5b": (14, 2, 64)}


def attention_graph(
    heads: int,
    kv_heads: int,
    head: int,
    packed: bool,
    rot: int,
    interleaved: bool,
    window: int,
    cache: int,
    half_kv: bool = False,
) -> bytes:
    """One GroupQueryAttention node as the fused graphs use it (rotary inside, BNSH past and
    present; inputs q or q/k/v, pk, pv, seqlens_k, total); ``rot``: columns of the cos/sin caches
    (0: no rotary), ``cache``: their rows; ``window`` < 0: no local window; ``half_kv``: the node
    as the packager writes it for a float16 KV cache (cloud/packaging/half_kv.py)."""
    from onnx import TensorProto, helper, numpy_helper

    from cloud.packaging.half_kv import half_kv_cache

    f = TensorProto.FLOAT
    q_width = (heads + 2 * kv_heads) * head if packed else heads * head
    inputs = [helper.make_tensor_value_info("q", f, ["B", "S", q_width])]
    if not packed:
        inputs += [helper.make_tensor_value_info(n, f, ["B", "S", kv_heads * head]) for n in ("k", "v")]
    inputs += [helper.make_tensor_value_info(n, f, ["B", kv_heads, "P", head]) for n in ("pk", "pv")]
    inputs += [
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["B"]),
        helper.make_tensor_value_info("total", TensorProto.INT32, []),
    ]
    inits = []
    if rot:
        angles = np.arange(cache)[:, None] * (10000.0 ** (-np.arange(rot) / rot))[None, :]
        inits = [
            numpy_helper.from_array(np.cos(angles).astype(np.float32), "cos"),
            numpy_helper.from_array(np.sin(angles).astype(np.float32), "sin"),
        ]
    attrs: dict[str, Any] = {"num_heads": heads, "kv_num_heads": kv_heads, "do_rotary": int(bool(rot))}
    if interleaved:
        attrs["rotary_interleaved"] = 1
    if window >= 0:
        attrs["local_window_size"] = window
    node = helper.make_node(
        "GroupQueryAttention",
        ["q", "" if packed else "k", "" if packed else "v", "pk", "pv", "seqlens_k", "total"]
        + (["cos", "sin"] if rot else []),
        ["out", "present_k", "present_v"],
        domain="com.microsoft",
        **attrs,
    )
    outputs = [helper.make_tensor_value_info("out", f, ["B", "S", heads * head])] + [
        helper.make_tensor_value_info(n, f, ["B", kv_heads, "T", head]) for n in ("present_k", "present_v")
    ]
    graph = helper.make_graph([node], "gqa", inputs, outputs, inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    if half_kv:
        half_kv_cache(model)
    return bytes(model.SerializeToString())


def time_call(
    model: bytes,
    library: Path | None,
    threads: int,
    reps: int,
    rows: int,
    seq: int,
    past: int,
    shape: tuple[int, int, int],
    half_kv: bool = False,
) -> float:
    """Median µs of one call: ``rows`` sequences, ``seq`` new positions each after ``past``."""
    import onnxruntime as ort

    heads, kv_heads, head = shape
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if library is not None:
        options.register_custom_ops_library(str(library))
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    capacity = -(-(past + seq) // 256) * 256
    binding = session.io_binding()
    binding.bind_output("out")
    binding.bind_cpu_input(
        "q", rng.standard_normal((rows, seq, (heads + 2 * kv_heads) * head)).astype(np.float32)
    )
    binding.bind_cpu_input("seqlens_k", np.full(rows, past + seq - 1, np.int32))
    binding.bind_cpu_input("total", np.asarray(past + seq, np.int32))
    for name_in, name_out in (("pk", "present_k"), ("pv", "present_v")):
        value = ort.OrtValue.ortvalue_from_numpy(
            rng.standard_normal((rows, kv_heads, capacity, head)).astype(
                np.float16 if half_kv else np.float32
            )
        )
        binding.bind_ortvalue_input(name_in, value)
        binding.bind_ortvalue_output(name_out, value)
    for _ in range(max(5, reps // 10)):
        session.run_with_iobinding(binding)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        session.run_with_iobinding(binding)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    ap.add_argument("--positions", type=int, nargs="+", default=[128, 512, 2048])
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    from edge_agent.runtime.kernels import library

    shape = SHAPES[args.shape]
    longest = max([*args.positions, args.prompt]) + 1
    model = attention_graph(
        *shape, packed=True, rot=shape[2] // 2, interleaved=False, window=-1, cache=longest
    )
    half_model = attention_graph(
        *shape, packed=True, rot=shape[2] // 2, interleaved=False, window=-1, cache=longest, half_kv=True
    )
    ours = library()
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cpus, {args.threads} threads; "
        f"{args.shape}: {shape[0]} heads, {shape[1]} KV heads of {shape[2]}; our kernels: {'yes' if ours else 'no'}"
    )
    cases = [
        (f"decode, {rows} row{'s' * (rows > 1)}, position {p}", rows, 1, p)
        for p in args.positions
        for rows in (1, 4)
    ]
    cases.append((f"first prompt of {args.prompt}", 1, args.prompt, 0))
    print(
        f"{'call':36s} {'onnxruntime µs':>15s} {'ours µs':>9s} {'ours faster':>12s}"
        f" {'ours, f16 KV µs':>16s} {'f16 KV faster':>14s}"
    )
    nan = float("nan")
    for label, rows, seq, past in cases:
        reps = args.reps if seq == 1 else 20
        theirs = time_call(model, None, args.threads, reps, rows, seq, past, shape)
        mine = time_call(model, ours, args.threads, reps, rows, seq, past, shape) if ours else None
        half = time_call(half_model, ours, args.threads, reps, rows, seq, past, shape, True) if ours else None
        print(
            f"{label:36s} {theirs:15.1f} {mine or nan:9.1f} {theirs / mine if mine else nan:11.2f}×"
            f" {half or nan:16.1f} {mine / half if mine and half else nan:13.2f}×"
        )


if __name__ == "__main__":
    main()
