"""Where a decode step's time goes: onnxruntime's profiler over one model's shipped graph, per op.

The model (``--model``, as bench/edge_decode.py builds them) in the graph the packager ships at
``--precision`` (fp32 with the edge's float ops, int8/int4 with a float16 KV cache), on the edge's
kernels (``--kernels auto``) or onnxruntime's own. A ``--context``-token prompt is prefilled, then
``--steps`` decode steps of ``--rows`` rows (1, or 2-4 sequences stepped together as the edge's
parallel slots step them) are profiled: per op type its milliseconds per step, nodes per
step and microseconds per node, and the step's wall time, onnxruntime's ``model_run`` time and the
sum of its nodes' times (the gap: what onnxruntime spends between nodes). The profiler itself
adds to every node: compare ops with each other, and time steps with bench/engine_steps.py.

Usage: python bench/step_profile.py [--model smollm2] [--precision int8] [--context 100] [--steps 50]
       [--rows 1] [--threads 2] [--workdir DIR] [--kernels auto|onnxruntime]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_decode import add_engine_options, fused_graphs, shipped_graph


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_engine_options(ap, context=100, steps=50)
    ap.add_argument("--kernels", choices=("auto", "onnxruntime"), default="auto")
    ap.add_argument("--rows", type=int, choices=(1, 2, 3, 4), default=1, help="Sequences per step.")
    args = ap.parse_args()
    import edge_agent.runtime.session as session
    from cloud.packaging.export import io_signature
    from edge_agent.runtime.kernels import library

    work = args.workdir or Path(tempfile.mkdtemp(prefix="autoglm-profile-"))
    _src, cfg, fp32, int8, int4 = fused_graphs(args.model, work)
    graph = shipped_graph({"fp32": fp32, "int8": int8, "int4": int4}[args.precision], args.precision, "auto")
    profiles = Path(tempfile.mkdtemp(prefix="autoglm-profile-out-"))
    plain_options = session._options

    def profiled(threads: int, lib: Path | None) -> Any:
        options = plain_options(threads, lib)
        options.enable_profiling = True
        options.profile_file_prefix = str(profiles / "step")
        return options

    session._options = profiled  # the session's own options, with the profiler on
    path = library() if args.kernels == "auto" else None
    io = io_signature(graph, cfg, {"eos_token_id": cfg.get("eos_token_id")})
    lm = session.OnnxCausalLM(graph, io, threads=args.threads, custom_ops=path)
    size = args.context + args.steps + 8
    decoders = [lm.decoder(size, busy=frozenset(range(i)), rows=args.rows) for i in range(args.rows)]
    for d in decoders:
        d.step([100 + i % 1000 for i in range(args.context)], last_only=True)
    start = time.perf_counter()
    for _ in range(args.steps):
        if args.rows == 1:
            decoders[0].step([5])
        else:
            lm.step_together(decoders, [5 + i for i in range(args.rows)])
    wall = (time.perf_counter() - start) / args.steps
    events = json.loads(Path(lm.session.end_profiling()).read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"][-args.steps :]
    first = runs[0]["ts"]
    per_op: dict[str, float] = collections.defaultdict(float)
    count: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first:
            per_op[e["args"]["op_name"]] += e["dur"]
            count[e["args"]["op_name"]] += 1
    n = args.steps
    print(
        f"{args.model} {args.precision}, {'our kernels' if lm.custom_ops_loaded else 'onnxruntime'}, "
        f"{args.threads} threads, {args.rows} row{'s' if args.rows > 1 else ''} a step, decode at position "
        f"{args.context}, {n} profiled steps"
    )
    print(
        f"wall {wall * 1e3:.2f} ms/step; model_run {sum(e['dur'] for e in runs) / n / 1e3:.2f} ms; "
        f"nodes {sum(per_op.values()) / n / 1e3:.2f} ms ({sum(count.values()) / n:.0f} nodes)"
    )
    print("| op | ms/step | nodes/step | µs/node |\n|---|---:|---:|---:|")
    for op, us in sorted(per_op.items(), key=lambda x: -x[1]):
        print(f"| {op} | {us / n / 1e3:.3f} | {count[op] / n:.0f} | {us / count[op]:.1f} |")


if __name__ == "__main__":
    main()
