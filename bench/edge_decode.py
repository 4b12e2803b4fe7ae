"""Edge decode speed: transformers fp32 generate vs our ONNX Runtime loop (fp32, int8), batch 1.

Builds a random-weight Llama of ~134M parameters (hidden 768, 12 layers, vocab 32000), exports it
with the packaging code, quantizes it, and times 64 greedy tokens after a 32-token prompt on
each engine, all in one run. Also measures this machine's memory copy bandwidth, which bounds
batch-1 decode: every token reads all non-embedding weights once, so

    ceiling tok/s = copy bandwidth (bytes/s) / weight bytes read per token.

Usage: python bench/edge_decode.py [--threads 2] [--runs 5] [--new-tokens 64] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.manifest import IOSignature


def build_model(out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(str(out))


def weight_bytes_per_token(graph: Path) -> int:
    """Bytes of initializers a decode step reads: all of them except embedding tables (one row each)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(graph), load_external_data=True)
    gathered = {n.input[0] for n in model.graph.node if n.op_type == "Gather"}
    total = 0
    for init in model.graph.initializer:
        if init.name in gathered:
            continue
        total += numpy_helper.to_array(init).nbytes
    return total


def copy_bandwidth(threads: int, mib: int = 512, repeats: int = 7) -> float:
    """Memory traffic per second while ``threads`` threads each copy their own large array.

    STREAM's copy convention: every copied byte is read once and written once, so it counts
    twice. numpy releases the GIL for the copy, so the threads really run in parallel."""
    n = mib * 1024 * 1024 // threads
    srcs = [np.ones(n, dtype=np.uint8) for _ in range(threads)]
    dsts = [np.empty(n, dtype=np.uint8) for _ in range(threads)]
    best = 0.0
    for _ in range(repeats):
        barrier = threading.Barrier(threads + 1)

        def work(i: int, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            np.copyto(dsts[i], srcs[i])

        workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        for w in workers:
            w.start()
        barrier.wait()
        t0 = time.perf_counter()
        for w in workers:
            w.join()
        best = max(best, 2 * threads * n / (time.perf_counter() - t0))
    return best


def time_transformers(src: Path, prompt: list[int], new_tokens: int, runs: int, threads: int) -> list[float]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    rates = []
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
        for _ in range(runs):
            t0 = time.perf_counter()
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
            dt = time.perf_counter() - t0
            assert out.shape[1] - len(prompt) == new_tokens
            rates.append(new_tokens / dt)
    return rates


def time_ours(
    graph: Path, io: IOSignature, prompt: list[int], new_tokens: int, runs: int, threads: int
) -> list[float]:
    from tokenizers import Tokenizer, models

    from edge_agent.runtime.generator import GenerationParams, TextGenerator
    from edge_agent.runtime.sampling import SamplingConfig
    from edge_agent.runtime.session import OnnxCausalLM

    lm = OnnxCausalLM(graph, io, threads=threads)
    # The decode loop works on token ids; the tokenizer is not on this path.
    gen = TextGenerator(lm, Tokenizer(models.BPE()))
    gen.eos_ids = frozenset()  # random weights: never stop early, always decode new_tokens
    params = GenerationParams(max_tokens=new_tokens, sampling=SamplingConfig(temperature=0.0))
    list(gen.token_ids(prompt, 4, params))  # warm-up
    rates = []
    for _ in range(runs):
        t0 = time.perf_counter()
        n = sum(1 for _ in gen.token_ids(prompt, new_tokens, params))
        dt = time.perf_counter() - t0
        assert n == new_tokens
        rates.append(new_tokens / dt)
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--workdir", type=Path, default=None, help="Keep (and reuse) the model files here.")
    args = ap.parse_args()

    import json

    from cloud.packaging.export import export_onnx, io_signature, parameter_count, read_hf_config
    from cloud.packaging.quantize import quantize_int8

    work = args.workdir or Path(tempfile.mkdtemp(prefix="autoglm-bench-"))
    src, fp32_dir, int8 = work / "hf", work / "onnx-fp32", work / "onnx-int8" / "model.onnx"
    if not (src / "config.json").exists():
        print(f"building random Llama in {src} …", flush=True)
        build_model(src)
    if not (fp32_dir / "model.onnx").exists():
        print("exporting to ONNX …", flush=True)
        export_onnx(src, fp32_dir)
    if not int8.exists():
        print("quantizing to int8 …", flush=True)
        quantize_int8(fp32_dir / "model.onnx", int8)
    cfg = read_hf_config(src)
    io = io_signature(
        fp32_dir / "model.onnx", cfg, json.loads((fp32_dir / "generation_config.json").read_text())
    )
    prompt = list(np.random.default_rng(0).integers(1, 32000, args.prompt_tokens))
    prompt = [int(t) for t in prompt]

    print("measuring memory bandwidth …", flush=True)
    bw = copy_bandwidth(args.threads)
    int8_bytes = weight_bytes_per_token(int8)
    fp32_bytes = weight_bytes_per_token(fp32_dir / "model.onnx")
    print("timing transformers fp32 generate …", flush=True)
    hf = statistics.median(time_transformers(src, prompt, args.new_tokens, args.runs, args.threads))
    print("timing our runtime fp32 …", flush=True)
    ours32 = statistics.median(
        time_ours(fp32_dir / "model.onnx", io, prompt, args.new_tokens, args.runs, args.threads)
    )
    print("timing our runtime int8 …", flush=True)
    ours8 = statistics.median(time_ours(int8, io, prompt, args.new_tokens, args.runs, args.threads))

    ceil8 = bw / int8_bytes
    ceil32 = bw / fp32_bytes
    print()
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cpus, {args.threads} threads; python {platform.python_version()}"
    )
    params = parameter_count(src)
    if params:
        print(
            f"model: random Llama, {params / 1e6:.1f}M parameters; batch 1, {args.prompt_tokens}-token prompt, {args.new_tokens} new tokens; medians of {args.runs}"
        )
    print(f"memory bandwidth (STREAM copy, read + write): {bw / 1e9:.1f} GB/s")
    print(f"weights read per token: fp32 {fp32_bytes / 1e6:.1f} MB, int8 {int8_bytes / 1e6:.1f} MB")
    print()
    print(f"{'engine':<28}{'tok/s':>9}{'vs transformers':>18}{'% of ceiling':>15}")
    print(f"{'transformers fp32 generate':<28}{hf:>9.1f}{1.0:>17.2f}x{hf / ceil32:>14.0%}")
    print(f"{'autoglm runtime fp32':<28}{ours32:>9.1f}{ours32 / hf:>17.2f}x{ours32 / ceil32:>14.0%}")
    print(f"{'autoglm runtime int8':<28}{ours8:>9.1f}{ours8 / hf:>17.2f}x{ours8 / ceil8:>14.0%}")
    print(f"{'ceiling int8 (bandwidth)':<28}{ceil8:>9.1f}")
    print(f"{'ceiling fp32 (bandwidth)':<28}{ceil32:>9.1f}")


if __name__ == "__main__":
    main()
