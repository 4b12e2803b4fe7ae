"""The edge runtime beside llama.cpp: same model, same machine, same threads, rounds interleaved.

For each model asked for (``--model``, repeatable; the models of bench/edge_decode.py):
``llama-134m`` (random weights), ``smollm2`` (SmolLM2-135M-Instruct, real weights) and
``qwen2-0.5b`` (random weights, Qwen2-0.5B's shape). From one Hugging Face folder it builds

- ours: the graphs ``autoglm model package`` ships (fused decoder; fp32, int8 and int4 weight-only
  MatMulNBits; int8 and int4 with the float16 KV cache it ships them with, ``--kv-cache``), run as the edge runs them (``runtime.kernels: auto``: the edge's own MatMulNBits
  kernels where the CPU has AVX-512 VNNI or AVX2, else onnxruntime's), timed through the edge's serving
  loop (``TextGenerator.token_ids``, sampling included) and its prefill as the serving loop feeds a
  prompt (``decoder.step`` over pieces of ``PREFILL_CHUNK`` tokens, lm_head on the last position
  only);
- llama.cpp's: the same folder converted with its own ``convert_hf_to_gguf.py`` (``--outtype
  f32``), then ``llama-quantize`` to Q8_0 and to Q4_0 ``--pure`` (every matrix at 4 bits, as ours;
  the default Q4_0 keeps the output matrix at 6-8 bits and reads more), timed by ``llama-bench``
  (``-n 64 -d 32``: 64 tokens after a 32-token context; ``-p 512``: a 512-token prompt).

Pairs: fp32 / F32, int8 / Q8_0, int4 / Q4_0 ``--pure``. Every round samples the machine's copy
bandwidth, then times each pair (ours and llama.cpp back to back, the order alternating), so a
ratio is ours / llama.cpp within one round; the table gives the median ratio of the rounds and its
interquartile range. The bandwidth ceiling of batch-1 decode is

    ceiling tok/s = copy bandwidth (bytes/s) / weight bytes read per token,

with the bytes counted from each engine's own files as its decode step reads them (all weights
but the embedding table's rows and our graphs' rotary caches, one row each per token; with tied
embeddings the table is read whole as the output matrix; our quantized rows without the padding to
whole blocks that MatMulNBits stores and the edge's kernels do not pack: bench/edge_decode.py).
Each round also samples a read-only probe (``read_bandwidth``: threads reading large arrays,
bench/read_probe.c): the copy convention counts a copied byte twice, and on some VMs plain
reading reaches well under that figure, so the report also gives each engine's weight stream (MB
per token × tokens per second) as a share of what reading alone reaches.

llama.cpp: ``bash bench/llamacpp_setup.sh DIR`` builds it from the source vendored in the
llama-cpp-python sdist, with a virtual environment for its converter; pass ``--llama-cpp DIR``.

A float32 prefill of 512 tokens is compute-bound: each round also samples the float32
multiply-add peak (``fma_peak``, bench/fma_peak.c), and the report gives each engine's fp32
prefill as model flops per second (``prefill_flops_per_token``) against it.

Where our kernels run (MatMulNBits in the quantized graphs, GroupQueryAttention in all three),
the graphs are timed a third time on onnxruntime's own kernels (``runtime.kernels:
onnxruntime``), so the table also says what the kernels add.

Usage: python bench/edge_vs_llamacpp.py --llama-cpp /tmp/llamacpp [--model llama-134m|smollm2|qwen2-0.5b ...]
       [--rounds 7] [--threads 2] [--workdir DIR] [--precision fp32|int8|int4 ...] [--kernels auto|onnxruntime]
       [--kv-cache auto|float32|float16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from edge_decode import (
    SETTLE_S,
    Engine,
    add_kv_cache_option,
    copy_bandwidth,
    fma_peak,
    fused_graphs,
    kernels_label,
    kv_types,
    ours_runner,
    prefill_seconds,
    read_bandwidth,
    shipped_graph,
    weight_bytes_per_token,
)

from edge_agent.runtime.kernels import library

MODELS = ("llama-134m", "smollm2", "qwen2-0.5b")
PRECISIONS = ("fp32", "int8", "int4")
# Ours → llama.cpp's file type and the llama-quantize arguments that make it.
PEER = {"fp32": ("F32", None), "int8": ("Q8_0", ["Q8_0"]), "int4": ("Q4_0 --pure", ["--pure", "Q4_0"])}
DECODE_TOKENS = 64
DECODE_CONTEXT = 32
PREFILL_TOKENS = 512
# Goals of issue 17, ours / llama.cpp.
DECODE_GOAL = {"fp32": 1.0, "int8": 1.3, "int4": 1.3}
PREFILL_GOAL = 1.2
CEILING_GOAL = {"int8": 0.85, "int4": 0.75}


@dataclass
class Peer:
    """A llama.cpp tree built by bench/llamacpp_setup.sh."""

    root: Path

    @property
    def bench(self) -> Path:
        return self.root / "llama.cpp" / "build" / "bin" / "llama-bench"

    @property
    def quantize(self) -> Path:
        return self.root / "llama.cpp" / "build" / "bin" / "llama-quantize"

    @property
    def convert(self) -> Path:
        return self.root / "llama.cpp" / "convert_hf_to_gguf.py"

    @property
    def python(self) -> Path:
        return self.root / "venv" / "bin" / "python"

    def check(self) -> None:
        missing = [p for p in (self.bench, self.quantize, self.convert, self.python) if not p.exists()]
        if missing:
            raise SystemExit(
                f"llama.cpp is not ready in {self.root} (missing {', '.join(map(str, missing))}): "
                f"run `bash bench/llamacpp_setup.sh {self.root}` first"
            )

    def version(self) -> str:
        out = subprocess.run([str(self.bench), "--version"], capture_output=True, text=True)
        lines = (out.stdout + out.stderr).strip().splitlines()
        return lines[0] if lines else "?"

    def run(self, gguf: Path, threads: int, *test: str) -> float:
        """tokens/s of one ``llama-bench`` test (one repetition after its warm-up run)."""
        cmd = [str(self.bench), "-m", str(gguf), "-t", str(threads), "-r", "1", "-o", "json", *test]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"llama-bench failed ({out.returncode}): {out.stderr[-2000:]}")
        rows = json.loads(out.stdout)
        if len(rows) != 1:
            raise RuntimeError(f"llama-bench gave {len(rows)} results for {test}")
        return float(rows[0]["avg_ts"])


def sentencepiece_tokenizer(src: Path, peer: Peer) -> None:
    """A small SentencePiece vocabulary for a random-weight model, which has none: llama.cpp's
    converter needs one and pads it to the model's vocab_size. Speed does not depend on it.
    Trained in the converter's environment, which has sentencepiece."""
    from cloud.packaging.quality import prose_text

    train = (
        "import sys, sentencepiece as spm; spm.SentencePieceTrainer.train(input=sys.argv[1], "
        "model_prefix=sys.argv[2], vocab_size=1000, model_type='bpe', byte_fallback=True, "
        "hard_vocab_limit=False, minloglevel=2)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "text.txt"
        text.write_text(prose_text().replace(". ", ".\n"))
        subprocess.run([str(peer.python), "-c", train, str(text), str(Path(tmp) / "tok")], check=True)
        (src / "tokenizer.model").write_bytes((Path(tmp) / "tok.model").read_bytes())


def gguf_files(kind: str, src: Path, work: Path, peer: Peer, precisions: list[str]) -> dict[str, Path]:
    """llama.cpp's files for ``precisions``, converted from the same folder as ours."""
    f32 = work / "gguf" / "model-F32.gguf"
    if not f32.exists():
        f32.parent.mkdir(parents=True, exist_ok=True)
        if kind != "smollm2" and not (src / "tokenizer.model").exists():
            sentencepiece_tokenizer(src, peer)
        print(f"converting {kind} with llama.cpp's convert_hf_to_gguf.py …", flush=True)
        subprocess.run(
            [str(peer.python), str(peer.convert), str(src), "--outtype", "f32", "--outfile", str(f32)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    files = {"fp32": f32}
    for precision in precisions:
        if precision == "fp32":
            continue
        name, args = PEER[precision]
        assert args is not None
        out = work / "gguf" / f"model-{name.replace(' --', '-')}.gguf"
        if not out.exists():
            print(f"llama-quantize {' '.join(args)} …", flush=True)
            cmd = [str(peer.quantize), *args[:-1], str(f32), str(out), args[-1]]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        files[precision] = out
    return files


def gguf_bytes_per_token(gguf: Path) -> int:
    """Bytes of tensors a decode step reads in a GGUF: all but the token embedding's, unless the
    file has no separate output matrix (tied embeddings: the table is the output matrix)."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(gguf)).tensors}
    total = sum(tensors.values())
    if "output.weight" in tensors:
        total -= tensors.get("token_embd.weight", 0)
    return total


@dataclass
class Ours:
    """One of our graphs, loaded once, timed like the edge serves it (bench/edge_decode.py's
    serving-loop engine: sampling included, prefix cache off so every round prefills)."""

    engine: Engine
    long_prompt: list[int]

    @classmethod
    def load(cls, graph: Path, cfg: dict[str, Any], threads: int, custom_ops: Path | None = None) -> Ours:
        from cloud.packaging.export import io_signature

        io = io_signature(graph, cfg, {"eos_token_id": cfg.get("eos_token_id")})
        rng = np.random.default_rng(0)
        vocab = int(cfg["vocab_size"])
        prompt = [int(t) for t in rng.integers(1, vocab, DECODE_CONTEXT)]
        long_prompt = [int(t) for t in rng.integers(1, vocab, PREFILL_TOKENS)]
        ours = cls(
            ours_runner(graph, io, prompt, DECODE_TOKENS, threads, long_prompt, custom_ops), long_prompt
        )
        ours.prefill()  # warm-up (the runner warmed the decode up)
        return ours

    def decode(self) -> float:
        """Decode tok/s: the tokens after the first over the time after the first."""
        return self.engine.run().decode

    def prefill(self) -> float:
        """Prompt tok/s of a PREFILL_TOKENS prompt: time to the last position's logits."""
        return PREFILL_TOKENS / prefill_seconds(self.engine.lm, self.long_prompt)


@dataclass
class Samples:
    """tok/s per round, by engine: "ours", "peer" (llama.cpp) and, where our kernels run, "ort"
    (the same graph on onnxruntime's own kernels: what our kernels add)."""

    decode: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    prefill: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))


def prefill_flops_per_token(cfg: dict[str, Any], prompt: int) -> float:
    """Multiply-add flops (2 each) per prompt token of a ``prompt``-token prefill, as a model-flops
    count: every layer's q/k/v/o and MLP matrices, causal attention (scores and value sums over the
    token's position on average) and the output matrix once per prompt (the last position's logits
    only, as both engines compute them)."""
    layers, hidden = int(cfg["num_hidden_layers"]), int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    matrices = hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * int(cfg["intermediate_size"])
    attention = 2 * heads * head_dim * (prompt + 1) / 2
    lm_head = hidden * int(cfg["vocab_size"]) / prompt
    return 2 * (layers * (matrices + attention) + lm_head)


def per_round(samples: dict[str, list[float]], a: str, b: str) -> tuple[float, float, float]:
    """Median and interquartile range of ``a`` / ``b`` within each round."""
    ratios = [x / y for x, y in zip(samples[a], samples[b], strict=True)]
    q1, q2, q3 = np.percentile(ratios, [25, 50, 75])
    return float(q2), float(q1), float(q3)


def spread(ratio: tuple[float, float, float], mark: str = "") -> str:
    """A median ratio and its interquartile range, as the tables print them."""
    median, low, high = ratio
    return f"{mark}{median:.2f}{mark} ({low:.2f}–{high:.2f})"


def bench_model(kind: str, work: Path, peer: Peer, args: argparse.Namespace) -> dict[str, Any]:
    src, cfg, fused32, fused8, fused4 = fused_graphs(kind, work)
    graphs = {
        p: shipped_graph(g, p, args.kv_cache)
        for p, g in (("fp32", fused32), ("int8", fused8), ("int4", fused4))
    }
    print(f"KV cache: {kv_types(graphs)}", flush=True)
    ggufs = gguf_files(kind, src, work, peer, args.precision)
    print("loading our engines …", flush=True)
    kernels = library() if args.kernels == "auto" else None
    ours = {p: Ours.load(graphs[p], cfg, args.threads, custom_ops=kernels) for p in args.precision}
    # The graphs our kernels took, once more on onnxruntime's own.
    ort_own = {
        p: Ours.load(graphs[p], cfg, args.threads)
        for p in args.precision
        if ours[p].engine.lm.custom_ops_loaded
    }
    for p in args.precision:  # llama-bench's own warm-up covers it, but not the page cache
        peer.run(ggufs[p], args.threads, "-p", "0", "-n", "4")
    samples = {p: Samples() for p in args.precision}
    bandwidths: list[float] = []
    reads: list[float] = []
    peaks: list[float] = []
    for r in range(args.rounds):
        print(f"{kind}: round {r + 1}/{args.rounds} …", flush=True)
        bandwidths.append(copy_bandwidth(args.threads, repeats=3)[0])
        reads.append(read_bandwidth(args.threads, repeats=3)[0])
        peak = fma_peak(args.threads) if "fp32" in args.precision else None
        if peak is not None:
            peaks.append(peak[0])
        order = args.precision[r % len(args.precision) :] + args.precision[: r % len(args.precision)]
        for p in order:
            s = samples[p]
            # Ours first on even rounds, llama.cpp first on odd ones; spinning threads settle between.
            mine = {"ours": ours[p], **({"ort": ort_own[p]} if p in ort_own else {})}
            engines = (*mine, "peer")
            for who in engines if r % 2 == 0 else engines[::-1]:
                time.sleep(SETTLE_S)
                if who in mine:
                    s.decode[who].append(mine[who].decode())
                    time.sleep(SETTLE_S)
                    s.prefill[who].append(mine[who].prefill())
                else:
                    s.decode["peer"].append(
                        peer.run(
                            ggufs[p],
                            args.threads,
                            "-p",
                            "0",
                            "-n",
                            str(DECODE_TOKENS),
                            "-d",
                            str(DECODE_CONTEXT),
                        )
                    )
                    time.sleep(SETTLE_S)
                    s.prefill["peer"].append(
                        peer.run(ggufs[p], args.threads, "-p", str(PREFILL_TOKENS), "-n", "0")
                    )
    bw = statistics.median(bandwidths)
    result: dict[str, Any] = {
        "model": kind,
        "bandwidth_gbps": bw / 1e9,
        "read_gbps": statistics.median(reads) / 1e9,
        "fma_gflops": statistics.median(peaks) / 1e9 if peaks else None,
        "prefill_mflop_per_token": prefill_flops_per_token(cfg, PREFILL_TOKENS) / 1e6,
        "pairs": {},
    }
    for p in args.precision:
        s = samples[p]
        ours_bytes, peer_bytes = weight_bytes_per_token(graphs[p]), gguf_bytes_per_token(ggufs[p])
        row: dict[str, Any] = {"peer": PEER[p][0]}
        for who in s.decode:
            row[f"{who}_decode"] = statistics.median(s.decode[who])
            row[f"{who}_prefill"] = statistics.median(s.prefill[who])
        row["decode_ratio"] = per_round(s.decode, "ours", "peer")
        row["prefill_ratio"] = per_round(s.prefill, "ours", "peer")
        row["ours_mb_per_token"] = ours_bytes / 1e6
        row["peer_mb_per_token"] = peer_bytes / 1e6
        row["ours_ceiling_share"] = row["ours_decode"] / (bw / ours_bytes)
        row["peer_ceiling_share"] = row["peer_decode"] / (bw / peer_bytes)
        row["ours_stream_gbps"] = row["ours_decode"] * ours_bytes / 1e9
        row["peer_stream_gbps"] = row["peer_decode"] * peer_bytes / 1e9
        if "ort" in s.decode:
            row["kernels_decode_gain"] = per_round(s.decode, "ours", "ort")
            row["kernels_prefill_gain"] = per_round(s.prefill, "ours", "ort")
        result["pairs"][p] = row
    return result


def report(result: dict[str, Any], rounds: int) -> None:
    print()
    print(
        f"{result['model']}: copy bandwidth median {result['bandwidth_gbps']:.1f} GB/s; decode = {DECODE_TOKENS} "
        f"tokens after {DECODE_CONTEXT}, prefill = {PREFILL_TOKENS}-token prompt; medians of {rounds} rounds; "
        "ratio = ours / llama.cpp per round, median (interquartile range)"
    )
    print()
    print(
        "| pair | decode tok/s ours | llama.cpp | decode ratio | MB/token ours / llama.cpp | % of ceiling ours / "
        "llama.cpp | prefill tok/s ours | llama.cpp | prefill ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for p, row in result["pairs"].items():
        print(
            f"| {p} / {row['peer']} | {row['ours_decode']:.1f} | {row['peer_decode']:.1f} | "
            f"{spread(row['decode_ratio'], '**')} | {row['ours_mb_per_token']:.1f} / {row['peer_mb_per_token']:.1f} | "
            f"{row['ours_ceiling_share']:.0%} / {row['peer_ceiling_share']:.0%} | {row['ours_prefill']:.0f} | "
            f"{row['peer_prefill']:.0f} | {spread(row['prefill_ratio'], '**')} |"
        )
    print()
    read = result["read_gbps"]
    print(
        f"  weights streamed per second in decode, against the read-only probe's {read:.1f} GB/s "
        "(what plain reading reaches here; the goals stay the copy ceiling's): "
        + "; ".join(
            f"{p} {row['ours_stream_gbps']:.1f} GB/s = {row['ours_stream_gbps'] / read:.0%} "
            f"(llama.cpp {row['peer_stream_gbps'] / read:.0%})"
            for p, row in result["pairs"].items()
        )
    )
    fp32, peak = result["pairs"].get("fp32"), result["fma_gflops"]
    if fp32 and peak:
        flops = result["prefill_mflop_per_token"] / 1e3
        ours, peer = fp32["ours_prefill"] * flops, fp32["peer_prefill"] * flops
        print(
            f"  fp32 prefill ({flops * 1e3:.0f} MFLOP per prompt token): ours {ours:.1f} GFLOP/s = "
            f"{ours / peak:.0%}, llama.cpp {peer:.1f} = {peer / peak:.0%} of the float32 FMA peak's "
            f"{peak:.1f} GFLOP/s (bench/fma_peak.c: compute-bound, the most either can reach here)"
        )
    for p, row in result["pairs"].items():
        if "kernels_decode_gain" in row:
            print(
                f"  {p}: our kernels vs onnxruntime's own, same graph: decode "
                f"{row['ours_decode']:.1f} vs {row['ort_decode']:.1f} tok/s = {spread(row['kernels_decode_gain'])}; "
                f"prefill {row['ours_prefill']:.0f} vs {row['ort_prefill']:.0f} = {spread(row['kernels_prefill_gain'])}"
            )
    print()
    for p, row in result["pairs"].items():
        goals = [
            f"decode ≥ {DECODE_GOAL[p]:.1f}×: {'met' if row['decode_ratio'][0] >= DECODE_GOAL[p] else 'NOT met'}"
        ]
        goals.append(
            f"prefill ≥ {PREFILL_GOAL:.1f}×: {'met' if row['prefill_ratio'][0] >= PREFILL_GOAL else 'NOT met'}"
        )
        if p in CEILING_GOAL:
            share = row["ours_ceiling_share"]
            goals.append(
                f"≥ {CEILING_GOAL[p]:.0%} of ceiling: {'met' if share >= CEILING_GOAL[p] else 'NOT met'}"
            )
        print(f"  {p}: " + "; ".join(goals))
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-cpp", type=Path, required=True, help="Folder made by bench/llamacpp_setup.sh.")
    ap.add_argument("--model", action="append", choices=MODELS, help="Repeatable [default: llama-134m].")
    ap.add_argument(
        "--precision", action="append", choices=PRECISIONS, help="Repeatable [default: all three]."
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--workdir", type=Path, default=None, help="Keep (and reuse) the model files here.")
    ap.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    add_kv_cache_option(ap, " (llama.cpp's cache is f16 by default)")
    ap.add_argument(
        "--kernels",
        choices=("auto", "onnxruntime"),
        default="auto",
        help="As the edge's runtime.kernels: auto = our kernels where this CPU runs them "
        "(and onnxruntime's own timed beside them), onnxruntime = onnxruntime's own only.",
    )
    args = ap.parse_args()
    args.precision = args.precision or list(PRECISIONS)
    peer = Peer(args.llama_cpp.resolve())
    peer.check()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import onnxruntime as ort

    our_kernels = kernels_label() if args.kernels == "auto" and library() else "no"
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; Python {platform.python_version()}, "
        f"onnxruntime {ort.__version__}; llama.cpp {peer.version()}; {args.threads} threads; our kernels: {our_kernels}",
        flush=True,
    )
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.model or ["llama-134m"]:
            work = (args.workdir or Path(tmp)) / kind
            work.mkdir(parents=True, exist_ok=True)
            result = bench_model(kind, work, peer, args)
            report(result, args.rounds)
            results.append(result)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
