"""What a MatMulNBits node costs by itself: a chain of nodes, each its own weights, timed as one run.

A decode step runs ~60-160 weight matrices one after another. This bench isolates that pattern
from the rest of a model: ``--nodes`` MatMulNBits nodes of one shape in a row (K -> N, then N -> K,
alternating, so the chain's output feeds the next node), every node with its own random weights,
so that a chain larger than the L3 streams its weights from memory as a decode step does. It
prints the time per run and per node and the weights' bytes over the time (GB/s). Two uses:

* the fixed cost of a node (dispatch, the hand-off to the thread pool and the join): tiny shapes
  (``--k 64 --n 64``), where the weights stay in L1/L2 and the time is nearly all overhead;
* how fast a decoder's own matrix shapes stream against large ones (``--k 576 --n 1536`` is
  SmolLM2's MLP, ``--k 2048 --n 8192`` a large one), against onnxruntime's own kernel or another
  build of the library (``--library PATH``, repeatable; every library is timed in turn, round by
  round, in one process).

Usage: python bench/node_chain.py [--k 576] [--n 1536] [--nodes 200] [--bits 8] [--block 128]
       [--rows 1] [--threads 2] [--rounds 7] [--library auto --library onnxruntime --library PATH]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from edge_decode import kernel_library


def chain_model(k: int, n: int, nodes: int, bits: int, block: int, rows: int) -> tuple[bytes, int]:
    """The chain's serialized ONNX model and its weights' bytes as our kernels read them (K
    elements a row, not the graph's rows padded to whole blocks, and the scales)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    graph_nodes, inits, total = [], [], 0
    dims = (k, n)
    for i in range(nodes):
        kin, nout = dims[i % 2], dims[(i + 1) % 2]
        blocks = (kin + block - 1) // block
        w = rng.integers(0, 256, (nout, blocks, block * bits // 8), dtype=np.uint8)
        s = (rng.random((nout, blocks), dtype=np.float32) * 0.01).astype(np.float32)
        total += nout * kin * bits // 8 + s.nbytes
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(s, f"s{i}")]
        graph_nodes.append(
            helper.make_node(
                "MatMulNBits",
                [f"x{i}", f"w{i}", f"s{i}"],
                [f"x{i + 1}"],
                domain="com.microsoft",
                K=kin,
                N=nout,
                bits=bits,
                block_size=block,
                accuracy_level=4,
            )
        )
    graph = helper.make_graph(
        graph_nodes,
        "chain",
        [helper.make_tensor_value_info("x0", TensorProto.FLOAT, [1, rows, k])],
        [helper.make_tensor_value_info(f"x{nodes}", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    return model.SerializeToString(), total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, default=576)
    ap.add_argument("--n", type=int, default=1536)
    ap.add_argument("--nodes", type=int, default=200)
    ap.add_argument("--bits", type=int, choices=(4, 8), default=8)
    ap.add_argument("--block", type=int, default=128, help="Block size (the packager's default: 128).")
    ap.add_argument("--rows", type=int, default=1, help="Activation rows per run (1: a decode step).")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--runs", type=int, default=30, help="Runs per round.")
    ap.add_argument("--library", action="append", default=None, help="auto, onnxruntime or a path.")
    args = ap.parse_args()
    if args.k < 1 or args.n < 1 or args.nodes < 1 or args.rows < 1 or args.rounds < 1 or args.runs < 1:
        raise SystemExit("--k, --n, --nodes, --rows, --rounds and --runs must be positive")

    import onnxruntime as ort

    model, weight_bytes = chain_model(args.k, args.n, args.nodes, args.bits, args.block, args.rows)
    x = np.random.default_rng(1).random((1, args.rows, args.k), dtype=np.float32)
    runners = {}
    for name in args.library or ["auto", "onnxruntime"]:
        path = kernel_library(name)
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        if path is not None:
            options.register_custom_ops_library(str(path))
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        binding = session.io_binding()
        binding.bind_cpu_input("x0", x)
        binding.bind_output(f"x{args.nodes}")
        for _ in range(args.runs):  # warm-up: packing done, pages touched
            session.run_with_iobinding(binding)
        runners[name] = (session, binding)

    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, (session, binding) in runners.items():
            start = time.perf_counter()
            for _ in range(args.runs):
                session.run_with_iobinding(binding)
            times[name].append((time.perf_counter() - start) / args.runs)

    print(
        f"machine: {platform.machine()} {platform.processor() or ''} {args.threads} threads; "
        f"onnxruntime {ort.__version__}; K={args.k} N={args.n} bits={args.bits} block={args.block} "
        f"rows={args.rows}; {args.nodes} nodes, {weight_bytes / 1e6:.1f} MB of weights; "
        f"medians of {args.rounds} rounds x {args.runs} runs"
    )
    print("| library | ms per run | µs per node | GB/s of weights |")
    print("|---|---:|---:|---:|")
    for name, samples in times.items():
        t = statistics.median(samples)
        print(f"| {name} | {t * 1e3:.3f} | {t * 1e6 / args.nodes:.2f} | {weight_bytes / t / 1e9:.1f} |")


if __name__ == "__main__":
    main()
