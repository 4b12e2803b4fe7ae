"""Latency the edge router adds when it falls back to the cloud, vs calling the gateway directly.

Everything is the real code as separate processes on loopback: a private mosquitto, the control
plane (``autoglm cloud serve``) whose gateway fronts a pool stub, and an edge agent
(``autoglm edge run``) with no local model and ``router.cloud_url`` pointing at the gateway, so
every request it gets falls back. The stub (bench/upstream_stub.py) answers every completion at
once with a fixed body, so what is measured is our HTTP hops, not generation:

    direct:   client → gateway → stub
    via edge: client → edge router → gateway → stub

Requests alternate between the two paths in blocks, one at a time (latency, not throughput).
Added latency = percentile(via edge) − percentile(direct).

Usage: python bench/fallback_overhead.py [--requests 2000] [--block 50]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud.mqtt.local_broker import LocalBroker, free_port
from cloud.processes import stop_process

STUB = Path(__file__).with_name("upstream_stub.py")


def _spawn(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "cloud.cli", *args], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
    )


def _wait(url: str, proc: subprocess.Popen[bytes], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"{url} did not answer in {timeout}s")


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000)[int(q * 1000) - 1] if len(values) > 1 else values[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000, help="per path")
    ap.add_argument("--block", type=int, default=50, help="requests per path before switching")
    args = ap.parse_args()

    from cloud.plane.auth import ApiKeys
    from cloud.plane.store import make_engine, migrate
    from shared.signing import SigningKey

    work = Path(tempfile.mkdtemp(prefix="autoglm-fallback-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    with LocalBroker() as broker:
        try:
            stub_port = free_port()
            procs.append(subprocess.Popen([sys.executable, str(STUB), str(stub_port)]))

            db = f"sqlite:///{work / 'cloud.db'}"
            engine = make_engine(db)
            migrate(engine)
            _, key = ApiKeys(engine).create("default", "bench", "inference")
            engine.dispose()
            (work / "registry" / "default").mkdir(parents=True)
            cloud_port = free_port()
            broker_cfg = {"host": broker.host, "port": broker.port}
            (work / "cloud.yaml").write_text(
                yaml.safe_dump(
                    {
                        "database_url": db,
                        "registry_dir": str(work / "registry"),
                        "broker": broker_cfg,
                        "api": {"port": cloud_port},
                        "gateway": {
                            "upstreams": [{"url": f"http://127.0.0.1:{stub_port}/v1", "name": "stub"}],
                            "rate_limit": {"requests_per_s": 1e6, "burst": 1_000_000},
                        },
                    }
                )
            )
            procs.append(
                _spawn(["cloud", "serve", "--config", str(work / "cloud.yaml"), "--log-level", "WARNING"])
            )
            gateway = f"http://127.0.0.1:{cloud_port}"

            edge_port = free_port()
            (work / "edge.yaml").write_text(
                yaml.safe_dump(
                    {
                        "device_id": "bench-edge",
                        "data_dir": str(work / "edge"),
                        "broker": broker_cfg,
                        "trusted_keys": [SigningKey.generate().public.b64],
                        "control": {"trusted_keys": [SigningKey.generate().public.b64]},
                        "api": {"port": edge_port},
                        "router": {"cloud_url": f"{gateway}/v1"},
                        "fallback": {"api_key": key},
                    }
                )
            )
            procs.append(
                _spawn(["edge", "run", "--config", str(work / "edge.yaml"), "--log-level", "WARNING"])
            )
            edge = f"http://127.0.0.1:{edge_port}"
            _wait(f"{gateway}/readyz", procs[1])
            _wait(f"{edge}/healthz", procs[2])

            body = {"model": "stub", "prompt": "hello", "max_tokens": 1}
            auth = {"authorization": f"Bearer {key}"}
            times: dict[str, list[float]] = {"direct": [], "via edge": []}
            targets = {
                "direct": (f"{gateway}/v1/completions", auth),
                "via edge": (f"{edge}/v1/completions", {}),
            }
            with httpx.Client(timeout=30) as client:
                for name, (url, headers) in targets.items():  # warm-up: connections, caches
                    for _ in range(100):
                        r = client.post(url, json=body, headers=headers)
                        if r.status_code != 200:
                            raise SystemExit(f"{name}: HTTP {r.status_code} {r.text}")
                    if name == "via edge" and r.headers.get("x-autoglm-served-by") != "cloud":
                        raise SystemExit("the edge did not fall back to the cloud")
                done = 0
                while done < args.requests:
                    n = min(args.block, args.requests - done)
                    for name, (url, headers) in targets.items():
                        for _ in range(n):
                            started = time.perf_counter()
                            r = client.post(url, json=body, headers=headers)
                            times[name].append((time.perf_counter() - started) * 1000)
                            assert r.status_code == 200, r.text
                    done += n
        finally:
            for p in reversed(procs):
                stop_process(p)

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; {args.requests} requests per path"
    )
    print(f"{'path':<36}{'p50 ms':>10}{'p90 ms':>10}{'p99 ms':>10}")
    for name, values in times.items():
        print(f"{name:<36}{_pct(values, 0.5):>10.3f}{_pct(values, 0.9):>10.3f}{_pct(values, 0.99):>10.3f}")
    added = {q: _pct(times["via edge"], q) - _pct(times["direct"], q) for q in (0.5, 0.9, 0.99)}
    print(f"{'added by the edge router':<36}{added[0.5]:>10.3f}{added[0.9]:>10.3f}{added[0.99]:>10.3f}")
    print(f"goal ≤ 1 ms added at p50: {'met' if added[0.5] <= 1.0 else 'NOT met'}")


if __name__ == "__main__":
    main()
