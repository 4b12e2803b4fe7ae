"""What the cloud gateway adds to a request, side by side with LiteLLM's proxy, in one run.

Three paths to one instant upstream (bench/upstream_stub.py: every chat completion answered at
once, a JSON body or eight SSE chunks and [DONE] when the request streams):

    direct:   client → stub
    ours:     client → `autoglm cloud serve` (the fallback gateway, one process) → stub
    litellm:  client → `litellm --num_workers 1` (LiteLLM proxy, its own venv) → stub

1. Latency at concurrency 1, paths interleaved in blocks: added p50/p90/p99 = path − direct,
   plain and streamed (time to the whole answer).
2. Throughput at concurrency 32 (and 8) for a fixed time per path: requests per second, plain and
   streamed, and the proxy's own CPU time per request (from /proc).

The load generator is its own process (aiohttp); all of it shares this machine's cores, the
proxies' numbers alike. LiteLLM's venv is made on first use (`--litellm-venv`, `pip install
'litellm[proxy]'`); nothing else is installed.

Usage: python bench/gateway_overhead.py [--requests 1000] [--seconds 10] [--litellm-venv DIR]
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
from pathlib import Path
from typing import Any

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud.mqtt.local_broker import LocalBroker, free_port
from cloud.processes import stop_process

STUB = Path(__file__).with_name("upstream_stub.py")
MODEL = "stub"


# -- the load generator (its own process) -----------------------------------------------------------
async def _load(spec: dict[str, Any]) -> dict[str, Any]:
    import aiohttp

    url, headers, stream = spec["url"], spec["headers"], spec["stream"]
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 8,
        "stream": stream,
    }
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def one() -> None:
            nonlocal errors
            t = time.perf_counter()
            async with session.post(url, json=body) as r:
                data = await r.read()
                if r.status != 200 or (stream and b"[DONE]" not in data):
                    errors += 1
            latencies.append((time.perf_counter() - t) * 1000)

        for _ in range(spec.get("warmup", 50)):
            await one()
        latencies.clear()
        if "requests" in spec:
            for _ in range(spec["requests"]):
                await one()
            return {"latencies": latencies, "errors": errors}
        deadline = time.perf_counter() + spec["seconds"]
        done = 0

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                await one()
                done += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(spec["concurrency"])))
        return {"rps": done / (time.perf_counter() - t0), "errors": errors, "latencies": latencies}


def _run_load(spec: dict[str, Any]) -> dict[str, Any]:
    r = subprocess.run(
        [sys.executable, __file__, "--load", json.dumps(spec)], capture_output=True, text=True, timeout=600
    )
    if r.returncode != 0:
        raise SystemExit(f"load generator failed: {r.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(r.stdout)
    return result


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its children that finished."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tree_cpu_s(pid: int) -> float:
    """CPU seconds of ``pid`` and its live descendants (LiteLLM's CLI starts uvicorn as a child)."""
    total = _cpu_s(pid)
    for child in Path(f"/proc/{pid}/task").glob("*/children"):
        for c in child.read_text().split():
            total += _tree_cpu_s(int(c))
    return total


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000)[int(q * 1000) - 1] if len(values) > 1 else values[0]


def _wait(
    url: str, proc: subprocess.Popen[bytes], timeout: float = 180, headers: dict[str, str] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2, headers=headers).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{url} did not answer in {timeout}s")


def _litellm(venv: Path) -> Path:
    exe = venv / "bin" / "litellm"
    if not exe.exists():
        print(f"making LiteLLM's venv in {venv} (pip install 'litellm[proxy]')", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "litellm[proxy]"], check=True)
    return exe


def _version(venv: Path) -> str:
    r = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
    )
    return r.stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1000, help="per path, at concurrency 1")
    ap.add_argument("--block", type=int, default=100, help="requests per path before switching")
    ap.add_argument("--seconds", type=float, default=10.0, help="per path and concurrency, for throughput")
    ap.add_argument(
        "--litellm-venv", type=Path, default=Path.home() / ".cache" / "autoglm-bench" / "litellm-venv"
    )
    ap.add_argument("--load", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load:
        print(json.dumps(asyncio.run(_load(json.loads(args.load)))))
        return

    from cloud.plane.auth import ApiKeys
    from cloud.plane.store import make_engine, migrate

    litellm = _litellm(args.litellm_venv)
    work = Path(tempfile.mkdtemp(prefix="autoglm-gateway-bench-"))
    procs: dict[str, subprocess.Popen[bytes]] = {}
    with LocalBroker() as broker:
        try:
            stub_port = free_port()
            procs["stub"] = subprocess.Popen([sys.executable, str(STUB), str(stub_port)])
            stub = f"http://127.0.0.1:{stub_port}/v1"

            db = f"sqlite:///{work / 'cloud.db'}"
            engine = make_engine(db)
            migrate(engine)
            _, key = ApiKeys(engine).create("default", "bench", "inference")
            engine.dispose()
            (work / "registry" / "default").mkdir(parents=True)
            cloud_port = free_port()
            (work / "cloud.yaml").write_text(
                yaml.safe_dump(
                    {
                        "database_url": db,
                        "registry_dir": str(work / "registry"),
                        "broker": {"host": broker.host, "port": broker.port},
                        "api": {"port": cloud_port},
                        "gateway": {
                            "upstreams": [{"url": stub, "name": "stub"}],
                            "rate_limit": {"requests_per_s": 1e6, "burst": 1_000_000},
                        },
                    }
                )
            )
            procs["ours"] = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "cloud.cli",
                    "cloud",
                    "serve",
                    "--config",
                    str(work / "cloud.yaml"),
                    "--log-level",
                    "WARNING",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
            )
            litellm_port = free_port()
            master = "sk-bench-master"
            (work / "litellm.yaml").write_text(
                yaml.safe_dump(
                    {
                        "model_list": [
                            {
                                "model_name": MODEL,
                                "litellm_params": {
                                    "model": f"openai/{MODEL}",
                                    "api_base": stub,
                                    "api_key": "x",
                                },
                            }
                        ],
                        "general_settings": {"master_key": master},
                        "litellm_settings": {"telemetry": False, "drop_params": True},
                    }
                )
            )
            env = {
                **os.environ,
                "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                "LITELLM_LOG": "ERROR",
                "LITELLM_TELEMETRY": "False",
            }
            procs["litellm"] = subprocess.Popen(
                [
                    str(litellm),
                    "--config",
                    str(work / "litellm.yaml"),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(litellm_port),
                    "--num_workers",
                    "1",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                env=env,
            )
            gateway = f"http://127.0.0.1:{cloud_port}"
            lite = f"http://127.0.0.1:{litellm_port}"
            _wait(f"{gateway}/readyz", procs["ours"])
            _wait(f"{lite}/health/liveliness", procs["litellm"])
            paths = {
                "direct": (f"{stub}/chat/completions", {}),
                "ours": (f"{gateway}/v1/chat/completions", {"authorization": f"Bearer {key}"}),
                "litellm": (f"{lite}/v1/chat/completions", {"authorization": f"Bearer {master}"}),
            }
            pids = {"ours": procs["ours"].pid, "litellm": procs["litellm"].pid}

            # 1. Latency at concurrency 1, interleaved in blocks.
            latency: dict[tuple[str, bool], list[float]] = {}
            for stream in (False, True):
                done = 0
                while done < args.requests:
                    n = min(args.block, args.requests - done)
                    for name, (url, headers) in paths.items():
                        r = _run_load(
                            {"url": url, "headers": headers, "stream": stream, "requests": n, "warmup": 20}
                        )
                        if r["errors"]:
                            raise SystemExit(f"{name}: {r['errors']} failed requests")
                        latency.setdefault((name, stream), []).extend(r["latencies"])
                    done += n

            # 2. Throughput.
            throughput: dict[tuple[str, bool, int], tuple[float, float | None, int]] = {}
            for concurrency in (8, 32):
                for stream in (False, True):
                    for name, (url, headers) in paths.items():
                        cpu0 = _tree_cpu_s(pids[name]) if name in pids else None
                        r = _run_load(
                            {
                                "url": url,
                                "headers": headers,
                                "stream": stream,
                                "seconds": args.seconds,
                                "concurrency": concurrency,
                            }
                        )
                        n = len(r["latencies"])
                        per = (_tree_cpu_s(pids[name]) - cpu0) * 1000 / n if cpu0 is not None and n else None
                        throughput[(name, stream, concurrency)] = (r["rps"], per, r["errors"])
        finally:
            for p in reversed(list(procs.values())):
                stop_process(p)

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"python {platform.python_version()}; litellm {_version(args.litellm_venv)}"
    )
    print(f"\nlatency at concurrency 1 ({args.requests} requests per path, interleaved by {args.block})")
    print(
        f"{'path':<12}{'stream':<8}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'added p50':>11}{'added p99':>11}"
    )
    for stream in (False, True):
        base = latency[("direct", stream)]
        for name in paths:
            v = latency[(name, stream)]
            added50 = _pct(v, 0.5) - _pct(base, 0.5)
            added99 = _pct(v, 0.99) - _pct(base, 0.99)
            print(
                f"{name:<12}{'yes' if stream else 'no':<8}{_pct(v, 0.5):>9.3f}{_pct(v, 0.9):>9.3f}{_pct(v, 0.99):>9.3f}"
                + ("" if name == "direct" else f"{added50:>11.3f}{added99:>11.3f}")
            )
    print(f"\nthroughput ({args.seconds:g} s per path)")
    print(f"{'path':<12}{'stream':<8}{'conc':>6}{'req/s':>10}{'CPU ms/req':>12}{'errors':>8}")
    for (name, stream, concurrency), (rps, per, errors) in throughput.items():
        cpu = f"{per:.2f}" if per is not None else "-"
        print(f"{name:<12}{'yes' if stream else 'no':<8}{concurrency:>6}{rps:>10.0f}{cpu:>12}{errors:>8}")
    for stream in (False, True):
        ours, lite = throughput[("ours", stream, 32)][0], throughput[("litellm", stream, 32)][0]
        print(f"ours / litellm at 32, {'streamed' if stream else 'plain'}: {ours / lite:.1f}x")


if __name__ == "__main__":
    main()
