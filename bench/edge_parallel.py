"""Parallel slots on the edge: N concurrent streams decoding together vs the same N one at a time.

Builds the graphs the packager ships for SmolLM2-135M-Instruct (real weights; fused decoder,
fp32 / int8 / int4 weight-only) and runs the edge's own serving path (``ModelHost`` with its
decode batcher) twice per round, interleaved: ``parallel 1`` (each request decodes alone, the
rest wait in the queue) and ``parallel N`` (all N decode in one batched step per token). Same
chat prompts (rendered with the model's template), greedy, end-of-sequence ignored so every
stream generates exactly ``--new-tokens``. Reports aggregate tok/s (all tokens over the wall time
from the first request to the last answer, prefills included), aggregate decode tok/s (tokens
after each stream's first, over the time when at least one stream was past its first token: the
later requests' prefills count), the rate while all N decode at once (from the last first token to
the first finish), the streams' times to first token, and checks that every stream's token ids are
the same both ways. Kernels as the edge's
``runtime.kernels: auto`` (ours where the CPU has AVX2 or AVX-512 VNNI); where ours run, both widths are
timed once more on onnxruntime's own kernels. Each timed round follows a 4-token round of the
same configuration (each is a session of its own: what ran before evicted its weights from the
caches). The KV cache is the packager's default for each
precision (``--kv-cache``).

Usage: python bench/edge_parallel.py [--streams 4] [--new-tokens 64] [--runs 5] [--threads 2]
       [--precision int8 --precision int4 ...] [--workdir DIR] [--kernels auto|onnxruntime]
       [--kv-cache auto|float32|float16]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from edge_decode import SETTLE_S, add_kv_cache_option, build_model, kernels_label, kv_types, shipped_graph

from edge_agent.runtime.kernels import library

QUESTIONS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "How do I boil an egg?",
    "Name three primary colours.",
    "Why is the sky blue?",
    "Give me a tip for learning Python.",
    "What is 12 times 12?",
    "Describe a cat in one sentence.",
)


@dataclass
class Round:
    wall_s: float
    decode_s: float
    tokens: int
    decode_tokens: int
    ids: list[list[int]]
    # Tokens that arrived while every stream was past its first token and none had finished, and
    # that window's seconds (0 when the streams never all decoded at once: one at a time).
    together_tokens: int = 0
    together_s: float = 0.0
    # Seconds from the round's start to each stream's first token (its time to first token).
    firsts: tuple[float, ...] = ()


def union_s(spans: list[tuple[float, float]]) -> float:
    """Seconds covered by the union of the (start, end) spans."""
    total, reach = 0.0, -float("inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def build(work: Path, precision: str) -> Path:
    from cloud.packaging.export import read_hf_config
    from cloud.packaging.fused import build_fused
    from cloud.packaging.quantize import quantize_weight_only, weight_block_size

    src = work / "hf"
    if not (src / "config.json").exists():
        print(f"importing SmolLM2 into {src} …", flush=True)
        build_model("smollm2", src)
    cfg = read_hf_config(src)
    fp32 = work / "fused-fp32" / "model.onnx"
    if not fp32.exists():
        print("building the fused graph …", flush=True)
        build_fused(src, cfg, fp32.parent)
    if precision == "fp32":
        return fp32
    bits = 8 if precision == "int8" else 4
    graph = work / f"fused-{precision}" / "model.onnx"
    if not graph.exists():
        print(f"quantizing to {precision} …", flush=True)
        quantize_weight_only(fp32, graph, bits, weight_block_size(bits, cfg["hidden_size"]))
    return graph


def decode_ratios(rounds: list[Round], other: list[Round]) -> list[float]:
    """Decode tok/s of ``rounds`` over ``other``'s, round by round."""
    return [
        (x.decode_tokens / x.decode_s) / (y.decode_tokens / y.decode_s)
        for x, y in zip(rounds, other, strict=True)
    ]


def make_host(  # type: ignore[no-untyped-def]
    src: Path,
    graph: Path,
    threads: int,
    parallel: int,
    invariant: bool,
    custom_ops: Path | None = None,
    gather: bool = True,
):
    from tokenizers import Tokenizer

    from cloud.packaging.export import io_signature, read_hf_config
    from edge_agent.runtime.batcher import GATHER_S
    from edge_agent.runtime.generator import TextGenerator
    from edge_agent.runtime.host import ModelHost
    from edge_agent.runtime.session import OnnxCausalLM

    cfg = read_hf_config(src)
    io = io_signature(graph, cfg, {"eos_token_id": cfg.get("eos_token_id")})
    lm = OnnxCausalLM(graph, io, threads=threads, custom_ops=custom_ops)
    if custom_ops is not None and not lm.custom_ops_loaded:
        raise SystemExit(f"{custom_ops} refused by {graph}: see the warning above")
    lm.prefix_cache = False  # rounds repeat their prompts: time every prefill
    gen = TextGenerator(lm, Tokenizer.from_file(str(src / "tokenizer.json")))
    gen.eos_ids = frozenset()  # every stream generates exactly new_tokens

    class Loaded:  # what ModelHost needs of a LoadedModel
        generator = gen
        batcher = None

    host = ModelHost(
        queue_size=64, parallel=parallel, batch_invariant=invariant, gather_s=GATHER_S if gather else 0.0
    )
    host.swap(Loaded())  # type: ignore[arg-type]
    return host


async def one_round(host, prompts: list[str], new_tokens: int) -> Round:  # type: ignore[no-untyped-def]
    from edge_agent.runtime.generator import GenerationParams, GenerationResult, Tokens
    from edge_agent.runtime.sampling import SamplingConfig
    from edge_agent.runtime.text import Prompt

    params = GenerationParams(max_tokens=new_tokens, sampling=SamplingConfig(temperature=0.0), token_ids=True)
    t0 = time.perf_counter()

    async def stream(text: str) -> tuple[float, float, GenerationResult, list[tuple[float, int]]]:
        _, items = await host.stream(Prompt(text), params)
        first = 0.0
        arrivals: list[tuple[float, int]] = []  # (when, how many ids) per Tokens item
        async for item in items:
            now = time.perf_counter()
            if not first:
                first = now
            if isinstance(item, Tokens):
                arrivals.append((now, len(item.ids)))
            if isinstance(item, GenerationResult):
                return first, now, item, arrivals
        raise AssertionError("no result")

    done = await asyncio.gather(*(stream(p) for p in prompts))
    end = max(e for _, e, _, _ in done)
    tokens = sum(r.completion_tokens for _, _, r, _ in done)
    # Decode time: when at least one stream was past its first token.
    decode_s = union_s([(f, e) for f, e, _, _ in done])
    # All streams decoding together: from the last first token to the first finish.
    lo, hi = max(f for f, _, _, _ in done), min(e for _, e, _, _ in done)
    together = sum(n for _, _, _, a in done for when, n in a if lo < when <= hi) if hi > lo else 0
    return Round(
        end - t0,
        decode_s,
        tokens,
        tokens - len(done),
        [r.token_ids for _, _, r, _ in done],
        together,
        max(hi - lo, 0.0),
        tuple(f - t0 for f, _, _, _ in done),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", action="append", choices=("int8", "int4", "fp32"))
    ap.add_argument("--workdir", type=Path, default=None, help="Keep (and reuse) the model files here.")
    add_kv_cache_option(ap)
    ap.add_argument(
        "--kernels",
        choices=("auto", "onnxruntime"),
        default="auto",
        help="As the edge's runtime.kernels: auto = our kernels where this CPU runs them (and "
        "both widths once more on onnxruntime's own), onnxruntime = onnxruntime's own only.",
    )
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="autoglm-parallel-"))
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cpus, {args.threads} threads; python {platform.python_version()}"
    )
    from edge_agent.runtime.chat import ChatTemplate

    precisions = args.precision or ["int8", "int4", "fp32"]
    graphs = {p: build(work, p) for p in precisions}
    graphs = {p: shipped_graph(g, p, args.kv_cache) for p, g in graphs.items()}
    print("KV cache: " + kv_types(graphs))
    template = ChatTemplate.from_folder(work / "hf")
    prompts = [
        template.prompt([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]).text
        for i in range(args.streams)
    ]
    n = args.streams
    kernels = library() if args.kernels == "auto" else None
    print(f"our kernels: {kernels_label() if kernels else 'no'}")
    # label: (parallel, batch_invariant, library, gather: a batcher starting from idle waits for the
    # requests still being tokenized, see DecodeBatcher.arriving)
    configs: dict[str, tuple[int, bool, Path | None, bool]] = {
        "1 at a time": (1, False, kernels, True),
        f"{n} together": (n, False, kernels, True),
        f"{n} together, not gathered": (n, False, kernels, False),
        "1 at a time, invariant": (1, True, kernels, True),
        f"{n} together, invariant": (n, True, kernels, True),
    }
    if kernels:
        configs["1 at a time, onnxruntime kernels"] = (1, False, None, True)
        configs[f"{n} together, onnxruntime kernels"] = (n, False, None, True)
    table = []
    for precision in precisions:
        hosts = {
            label: make_host(work / "hf", graphs[precision], args.threads, par, inv, lib, gather)
            for label, (par, inv, lib, gather) in configs.items()
        }
        for host in hosts.values():
            asyncio.run(one_round(host, prompts, 4))  # warm-up (and the KV rows allocated)
        results: dict[str, list[Round]] = {label: [] for label in hosts}
        for r in range(args.runs):
            print(f"{precision} round {r + 1}/{args.runs} …", flush=True)
            labels = list(hosts)
            for label in labels[r % len(labels) :] + labels[: r % len(labels)]:
                # Every configuration is a session of its own (its own repacked weights): the one
                # timed last evicted this one's from the caches, and the first steps after a switch
                # would be charged to whichever configuration has the fewest steps (the parallel
                # one). A short round first, so each is timed as a device serving one model runs.
                asyncio.run(one_round(hosts[label], prompts, 4))
                time.sleep(SETTLE_S)
                results[label].append(asyncio.run(one_round(hosts[label], prompts, args.new_tokens)))
        base = results["1 at a time"]
        for label, rounds in results.items():
            overall = statistics.median(x.tokens / x.wall_s for x in rounds)
            decode = statistics.median(x.decode_tokens / x.decode_s for x in rounds)
            paired = sorted(decode_ratios(rounds, base))
            mode = label.partition(",")[2]  # "", " invariant", " onnxruntime kernels" or " not gathered"
            twin = results.get("1 at a time" + ("," + mode if mode else ""), base)
            same = all(x.ids == t.ids for x, t in zip(rounds, twin, strict=True))
            own = statistics.median(decode_ratios(rounds, twin))
            # With every stream decoding at once (rows of parallel decoding only): that window's
            # tok/s over the decode tok/s of the lone stream in the same mode and round.
            steady = [
                (x.together_tokens / x.together_s) / (y.decode_tokens / y.decode_s)
                for x, y in zip(rounds, twin, strict=True)
                if x.together_s > 0 and x.together_tokens
            ]
            first = (
                statistics.median(statistics.mean(x.firsts) for x in rounds) * 1e3,
                statistics.median(max(x.firsts) for x in rounds) * 1e3,
            )
            table.append((precision, label, overall, decode, paired, own, same, steady, first))

    print()
    print(
        f"SmolLM2-135M-Instruct, {n} concurrent chat requests, {args.new_tokens} new tokens each "
        f"(greedy, EOS ignored), {args.threads} threads; medians of {args.runs} interleaved rounds"
    )
    print(
        f"{'graph':<7}{'decoding':<36}{'tok/s':>8}{'decode tok/s':>14}{'vs 1 at a time':>16}"
        f"{'(paired min–max)':>19}{'vs own lone':>13}{'ids as alone':>14}{'all decoding':>14}"
        f"{'first token ms':>16}"
    )
    for precision, label, overall, decode, paired, own, same, steady, first in table:
        together = (
            f"{statistics.median(steady):.2f}×" if steady and label.split(",")[0] != "1 at a time" else "—"
        )
        print(
            f"{precision:<7}{label:<36}{overall:>8.1f}{decode:>14.1f}{statistics.median(paired):>15.2f}×"
            f"{f'{paired[0]:.2f}–{paired[-1]:.2f}':>19}{own:>12.2f}×{same!s:>14}{together:>14}"
            f"{f'{first[0]:.0f} / {first[1]:.0f}':>16}"
        )
    print()
    print("'ids as alone': every stream's token ids equal those of the same request decoded one at a time")
    print("(in the same mode; 'vs own lone' is the decode ratio to it). 'decode tok/s' counts tokens after")
    print("each stream's first over the time when at least one stream was past its first token (so the later")
    print("requests' prefills, read between the first stream's steps, count as its decode time). 'all")
    print("decoding': the tok/s of the window in which every stream was decoding (from the last first token")
    print("to the first finish), over the decode tok/s of the lone stream in the same mode; median of the")
    print("rounds' ratios. 'first token ms': from the round's start to a stream's first token, the mean of")
    print("the streams / the last of them (medians over rounds; one at a time, the later streams wait for")
    print("the earlier ones' answers).")


if __name__ == "__main__":
    main()
