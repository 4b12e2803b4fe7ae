"""Engine steps with one kernel library against another: a model's decode step at 1 and 4 rows and
a 512-token prefill, no serving loop, every library loaded in one process and stepped in turn.

The model (``--model``, as bench/edge_decode.py builds them: SmolLM2-135M-Instruct by default, or
a random Llama-134M, GLM-135M or Qwen2-0.5B) in the graph the packager ships at ``--precision``.

Each ``--library`` is a custom-op library's path, ``auto`` (the one the install built, as the
edge registers it) or ``onnxruntime`` (none: onnxruntime's own kernels). For a library without
one of our ops, build one from the same sources, e.g. MatMulNBits without our attention:

    gcc -O3 -shared -fPIC -fvisibility=hidden -DAUTOGLM_NO_ATTENTION \\
        -I edge_agent/runtime/kernels/include edge_agent/runtime/kernels/*.c -o /tmp/no_attention.so

Per round and library: a 512-token prefill from an empty cache; four sequences prefilled with the
same ``--context``-token prompt on four KV rows; then ``--steps`` decode steps of row 0 alone and
as many of all four together (``step_together``: one batched step). Medians over rounds of the
per-round median step; "4 rows ÷ 1" is how many times one row's decode rate four rows reach.

Usage: python bench/engine_steps.py [--model smollm2] [--precision int8] [--context 300] [--rounds 5] [--steps 24]
       [--threads 2] [--workdir DIR] [--library auto --library onnxruntime --library PATH ...]
       [--kv-cache float32|float16|both] [--fp32-graph float-ops|plain|both] [--bias-add folded|apart|both]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_decode import (
    add_engine_options,
    bias_apart_graph,
    float_ops_graph,
    fused_graphs,
    half_kv_graph,
    kernel_library,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_engine_options(ap, context=300, steps=24)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--library", action="append", default=None)
    ap.add_argument(
        "--kv-cache",
        choices=("float32", "float16", "both"),
        default="float32",
        help="The graph's KV cache type (float16: as `autoglm model package --kv-cache float16` ships it).",
    )
    ap.add_argument(
        "--fp32-graph",
        choices=("float-ops", "plain", "both"),
        default="float-ops",
        help="fp32: the graph as the packager ships it (its matmuls the edge's float ops), "
        "the plain one (onnxruntime's MatMul), or both side by side.",
    )
    ap.add_argument(
        "--bias-add",
        choices=("folded", "apart", "both"),
        default="folded",
        help="A model with q/k/v biases (Qwen2): its graph as the packager ships it (each bias "
        "added by the norm-matmul op before it), with each bias an Add node of its own (as "
        "packages before that did), or both side by side.",
    )
    args = ap.parse_args()
    from cloud.packaging.export import io_signature
    from edge_agent.runtime.session import OnnxCausalLM

    work = args.workdir or Path(tempfile.mkdtemp(prefix="autoglm-steps-"))
    _src, cfg, fp32, int8, int4 = fused_graphs(args.model, work)
    if args.precision != "fp32":
        bases = {"": {"int8": int8, "int4": int4}[args.precision]}
    elif args.fp32_graph == "both":
        bases = {"float-ops": float_ops_graph(fp32), "plain": fp32}
    else:
        bases = {"": float_ops_graph(fp32) if args.fp32_graph == "float-ops" else fp32}
    if args.bias_add != "folded":
        apart = {label: bias_apart_graph(graph) for label, graph in bases.items()}
        if None in apart.values():
            raise SystemExit(f"{args.model} {args.precision}: no q/k/v bias folded into an op to set apart")
        named = {", ".join(x for x in (label, "bias apart") if x): g for label, g in apart.items() if g}
        if args.bias_add == "both":
            named |= {", ".join(x for x in (label, "bias folded") if x): g for label, g in bases.items()}
        bases = named
    graphs = {}
    for label, graph in bases.items():
        if args.kv_cache in ("float32", "both"):
            graphs[", ".join(x for x in (label, "float32 KV") if x)] = graph
        if args.kv_cache in ("float16", "both"):
            graphs[", ".join(x for x in (label, "float16 KV") if x)] = half_kv_graph(graph)
    models: dict[str, OnnxCausalLM] = {}
    for kv, path_of in graphs.items():
        io = io_signature(path_of, cfg, {"eos_token_id": cfg.get("eos_token_id")})
        for name in args.library or ["auto", "onnxruntime"]:
            path = kernel_library(name)
            lm = OnnxCausalLM(path_of, io, threads=args.threads, custom_ops=path)
            if path is not None and not lm.custom_ops_loaded:
                raise SystemExit(f"{path} refused by {path_of}: see the warning above")
            lm.prefix_cache = False  # every round prefills from an empty cache
            models[name if len(graphs) == 1 else f"{name}, {kv}"] = lm
    rng = np.random.default_rng(0)
    top = min(40000, next(iter(models.values())).io.vocab_size)  # Llama-134M has 32,000 ids
    prompt = rng.integers(100, top, args.context).tolist()
    long_prompt = rng.integers(100, top, 512).tolist()
    times: dict[str, dict[str, list[float]]] = {k: {"1": [], "4": [], "prefill": []} for k in models}
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds} …", flush=True)
        for name, lm in models.items():
            start = time.perf_counter()
            lm.decoder(600).step(long_prompt, last_only=True)
            times[name]["prefill"].append(time.perf_counter() - start)
            decoders = [  # row 0 steps alone, then with the others: 2 x steps past the prompt
                lm.decoder(args.context + 2 * args.steps + 8, busy=frozenset(range(i)), rows=4)
                for i in range(4)
            ]
            for d in decoders:
                d.step(prompt, last_only=True)
            one, four = [], []
            for _ in range(args.steps):
                start = time.perf_counter()
                decoders[0].step([5])
                one.append(time.perf_counter() - start)
            for _ in range(args.steps):
                start = time.perf_counter()
                lm.step_together(decoders, [5, 6, 7, 8])
                four.append(time.perf_counter() - start)
            times[name]["1"].append(statistics.median(one))
            times[name]["4"].append(statistics.median(four))
    print(
        f"\nmachine: {platform.machine()} {os.cpu_count()} cpus, {args.threads} threads; {args.model} {args.precision}, "
        f"KV cache {args.kv_cache}, decode at position {args.context}; medians of {args.rounds} rounds × {args.steps} steps"
    )
    print("| library | 1-row step ms | 4-row step ms | 4 rows ÷ 1 | 512-token prefill ms |")
    print("|---|---:|---:|---:|---:|")
    for name, t in times.items():
        ms1, ms4, prefill_ms = (statistics.median(t[k]) * 1e3 for k in ("1", "4", "prefill"))
        print(f"| {name} | {ms1:.2f} | {ms4:.2f} | {4 * ms1 / ms4:.2f} | {prefill_ms:.1f} |")


if __name__ == "__main__":
    main()
