"""Pool throughput: N concurrent requests on our pool vs the same requests one after another
with transformers ``generate``, in one run.

Our side is the real thing: ``autoglm pool serve`` as its own process (continuous batching), N
clients posting ``/v1/completions`` at once over HTTP. The baseline loads the same folder with
transformers in this process and runs ``model.generate`` (greedy, KV cache) per request, one after
another. Both stop at EOS or ``--max-tokens``; throughput is generated tokens over wall time.

Model: ``--model DIR`` (any local Hugging Face causal LM), else the demo GLM (built and briefly
trained here once, into --workdir). On a GPU machine, pass e.g. ``--device cuda`` and a bigger
model: the pool runs bf16 there, the baseline too.

Usage: python bench/pool_throughput.py [--model DIR] [--concurrency 16] [--max-tokens 128]
                                       [--device auto|cpu|cuda] [--rounds 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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


def baseline(model_dir: Path, prompts: list[str], max_tokens: int, device: str) -> tuple[float, int]:
    """transformers generate, one request after another: (seconds, tokens generated)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dtype = torch.bfloat16 if use_cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(
        "cuda" if use_cuda else "cpu"
    )
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    eos = model.generation_config.eos_token_id
    tokens = 0
    started = time.perf_counter()
    with torch.inference_mode():
        for p in prompts:
            ids = tok(p, return_tensors="pt").input_ids.to(model.device)
            out = model.generate(
                ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos
            )
            new = out[0, ids.shape[1] :].tolist()
            tokens += len([t for t in new if t != eos])
    if use_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - started, tokens


async def ours(url: str, name: str, prompts: list[str], max_tokens: int) -> tuple[float, int]:
    """All requests at once against the pool: (seconds, tokens generated)."""
    async with httpx.AsyncClient(timeout=600) as client:

        async def one(p: str) -> int:
            r = await client.post(
                f"{url}/v1/completions",
                json={"model": name, "prompt": p, "max_tokens": max_tokens, "temperature": 0},
            )
            r.raise_for_status()
            return int(r.json()["usage"]["completion_tokens"])

        started = time.perf_counter()
        counts = await asyncio.gather(*(one(p) for p in prompts))
        return time.perf_counter() - started, sum(counts)


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="Hugging Face model folder [default: the demo GLM]")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of both; medians reported")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "autoglm-bench")
    args = ap.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    model_dir = args.model or demo_model(args.workdir)
    prompts = [PROMPTS[i % len(PROMPTS)] + f"# request {i}\n" for i in range(args.concurrency)]
    name = "bench"
    proc, url = start_pool(model_dir, name, args.device, max_batch=max(args.concurrency, 1))
    try:
        device = httpx.get(f"{url}/readyz", timeout=5).json()["device"]
        asyncio.run(ours(url, name, prompts[:2], 8))  # warm-up
        base_rates, our_rates, base_tokens, our_tokens = [], [], 0, 0
        for rnd in range(args.rounds):
            s, n = baseline(model_dir, prompts, args.max_tokens, args.device)
            base_rates.append(n / s)
            base_tokens = n
            s2, n2 = asyncio.run(ours(url, name, prompts, args.max_tokens))
            our_rates.append(n2 / s2)
            our_tokens = n2
            print(
                f"round {rnd + 1}: transformers sequential {n} tokens in {s:.2f}s ({n / s:.1f} tok/s) · "
                f"pool {n2} tokens in {s2:.2f}s ({n2 / s2:.1f} tok/s)",
                flush=True,
            )
    finally:
        stop_process(proc)

    base, our = statistics.median(base_rates), statistics.median(our_rates)
    print()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; pool device: {device}"
    )
    print(
        f"model: {model_dir}; {args.concurrency} concurrent requests, up to {args.max_tokens} new tokens each"
    )
    print(f"{'engine':<44}{'tokens':>8}{'tok/s (median)':>16}{'ratio':>8}")
    print(f"{'transformers generate, one after another':<44}{base_tokens:>8}{base:>16.1f}{1.0:>7.2f}×")
    print(
        f"{'autoglm pool, all at once (continuous batch)':<44}{our_tokens:>8}{our:>16.1f}{our / base:>7.2f}×"
    )
    print(f"goal ≥ 5×: {'met' if our / base >= 5 else 'NOT met'}")


if __name__ == "__main__":
    main()
