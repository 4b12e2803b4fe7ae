"""Rollout convergence at fleet scale: N simulated devices, one real control plane.

Starts a private mosquitto and `autoglm cloud serve` (a real process, SQLite or the PostgreSQL
URL given), then N lightweight protocol clients, each its own persistent MQTT v5 session with
a Last Will: they report themselves, and when a desired state arrives they report it applied
(phase active, the model in slot a) as an agent does after an update. Then one rollout of a
(tiny, signed) model to all of them in a single wave, through the REST API, timed until the
control plane reports it completed; the control plane's CPU time and peak memory over that
window are read from /proc.

With ``--console``, once the rollout completed (devices still connected), the operator console
signs in and the fleet page is fetched under several queries: the server's own time per page
(its Server-Timing header) and the time the client saw are printed.

The broker runs with the production persistence setting (periodic autosave) unless
``--autosave changes`` asks for the tests' setting; the output says which. Every simulated device
holds a socket in its simulator process and in its broker, and one process may hold at most
20,000 open files in this project's containers: so the devices are simulated by one process per
``--per-process`` devices (15,000 by default), each connected to a mosquitto of its own; the
first mosquitto is the one the control plane uses, the others bridge the device topics to it
(desired states in, reports and status out), as brokers are scaled out. Up to 15,000 devices that
is one simulator and one broker. Every device also takes a local port: above ~28,000 devices
widen ``net.ipv4.ip_local_port_range`` (the bench says how). Large runs back to back need a
minute between them for loopback ports in TIME_WAIT to free up ("Address already in use"
otherwise).

Usage: python bench/rollout_scale.py [--devices 1000] [--database-url URL] [--autosave periodic|changes]
                                     [--per-process 15000] [--tick-s 0.5] [--console] [--profile FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud.mqtt.local_broker import LocalBroker, free_port
from cloud.plane.auth import ApiKeys
from cloud.plane.store import make_engine, migrate
from cloud.processes import stop_process
from cloud.registry import ModelRegistry
from shared.blobs import describe_bytes
from shared.manifest import FileEntry, IOSignature, Manifest, Quantization, SignedManifest
from shared.messages import DesiredState, DeviceStatus, Phase, ReportedState
from shared.mqtt import QOS, BrokerSettings, make_client, payload_bytes
from shared.signing import SigningKey
from shared.topics import Topics

TENANT = "bench"


def fake_model(registry: ModelRegistry) -> None:
    graph = b"not a real graph: the simulated devices never load it"
    registry.blobs.put_bytes(graph)
    manifest = Manifest(
        name="bench-model",
        version="1",
        created_at=datetime.now(UTC),
        architecture="LlamaForCausalLM",
        parameters=1,
        files=[FileEntry(path="model.onnx", role="graph", blob=describe_bytes(graph))],
        io=IOSignature(
            inputs=[],
            outputs=[],
            num_layers=1,
            num_kv_heads=1,
            head_dim=8,
            vocab_size=8,
            context_length=8,
            model_type="llama",
        ),
        quantization=Quantization(method="none", weight_type="float32"),
    )
    registry.publish(SignedManifest.sign(manifest, SigningKey.generate()))


async def device(i: int, broker: BrokerSettings, topics: Topics) -> None:
    device_id = f"sim-{i:05d}"
    will = DeviceStatus(device_id=device_id, state="offline").to_json()
    import aiomqtt

    async with make_client(
        broker, device_id, will=aiomqtt.Will(topics.status(device_id), will, qos=QOS, retain=True)
    ) as client:
        await client.subscribe(topics.desired(device_id), qos=QOS)
        await client.publish(
            topics.status(device_id),
            DeviceStatus(device_id=device_id, state="online").to_json(),
            qos=QOS,
            retain=True,
        )
        idle = ReportedState(device_id=device_id, revision=-1, phase=Phase.IDLE)
        await client.publish(topics.reported(device_id), idle.to_json(), qos=QOS, retain=True)
        async for message in client.messages:
            desired = DesiredState.from_json(payload_bytes(message))
            reported = ReportedState(
                device_id=device_id,
                revision=desired.revision,
                phase=Phase.ACTIVE,
                active_slot="a",
                slots={"a": desired.model, "b": None},
            )
            await client.publish(topics.reported(device_id), reported.to_json(), qos=QOS, retain=True)


def raise_open_files(want: int) -> None:
    """Raise this process's open-file limit towards ``want`` (above the hard limit only as root)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
        except (ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def simulate(first: int, count: int, port: int) -> None:
    """A simulator process: devices ``first`` .. ``first + count - 1`` on the broker at ``port``,
    until SIGTERM."""
    raise_open_files(count + 1024)
    broker = BrokerSettings(host="127.0.0.1", port=port)

    async def one(i: int, topics: Topics) -> None:
        try:
            await device(i, broker, topics)
        except Exception as exc:  # a device that cannot connect: say why and stop, do not hang the run
            print(f"simulated device {i} failed: {exc!r}", file=sys.stderr, flush=True)
            os._exit(3)

    async def run() -> None:
        topics = Topics(TENANT)
        tasks = []
        for i in range(first, first + count):
            tasks.append(asyncio.create_task(one(i, topics)))
            if i % 50 == 49:
                await asyncio.sleep(0.05)  # do not open 1,000 connections in one burst
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(run())


def bridge_lines(name: str, core_port: int) -> list[str]:
    """A mosquitto bridge carrying the simulated devices' topics to and from the core broker."""
    root = Topics(TENANT).root
    return [
        f"connection {name}",
        f"address 127.0.0.1:{core_port}",
        f"topic {root}/devices/+/desired in {QOS}",
        f"topic {root}/devices/+/reported out {QOS}",
        f"topic {root}/devices/+/status out {QOS}",
        "cleansession true",
        "notifications false",
        "bridge_protocol_version mqttv311",
    ]


def proc_stats(pid: int) -> tuple[float, int]:
    """(CPU seconds user+system, resident bytes) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    return cpu, rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--database-url", default=None, help="Default: a fresh SQLite file.")
    ap.add_argument("--give-up-after", type=float, default=600.0, help="Seconds to wait for convergence.")
    ap.add_argument(
        "--tick-s",
        type=float,
        default=0.5,
        help="The control plane's rollout tick (rollouts.tick_s; the shipped default is 1.0).",
    )
    ap.add_argument(
        "--autosave",
        choices=["periodic", "changes"],
        default="periodic",
        help="The broker saves its persistence file every 60 s (as manifests/base/broker.yaml and "
        "`fleet broker-config` ship) or after every change (as the tests' brokers do).",
    )
    ap.add_argument(
        "--per-process",
        type=int,
        default=15_000,
        help="Devices per simulator process and per broker (one process may hold 20,000 sockets here).",
    )
    ap.add_argument(
        "--console", action="store_true", help="Then time the console's fleet page over these devices."
    )
    ap.add_argument(
        "--simulate", nargs=3, type=int, metavar=("FIRST", "COUNT", "PORT"), help=argparse.SUPPRESS
    )
    ap.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="Attach py-spy (pip install py-spy) to the control plane over the timed window (POST → "
        "completed) and write its raw (collapsed) stacks here, 100 samples per second of the thread "
        "holding the GIL (Python's own CPU; SQLite's, which releases it, is not sampled), for "
        "finding where the per-device CPU goes.",
    )
    args = ap.parse_args()
    if args.simulate:
        simulate(*args.simulate)
        return
    if args.per_process < 1:
        raise SystemExit("--per-process must be at least 1")
    if args.profile and not Path(sys.executable).with_name("py-spy").exists():
        raise SystemExit(f"--profile needs py-spy beside {sys.executable}: pip install py-spy")
    # One socket per device of its slice in each broker, which inherits this limit.
    raise_open_files(min(args.devices, args.per_process) + 1024)
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    if high - low + 1 < args.devices + 1000:
        raise SystemExit(
            f"{args.devices} loopback connections need as many local ports, and only {high - low + 1} "
            f"are in net.ipv4.ip_local_port_range ({low}-{high}); as root: "
            "sysctl -w net.ipv4.ip_local_port_range='10000 65000'"
        )

    work = Path(tempfile.mkdtemp(prefix="autoglm-rollout-bench-"))
    registry = ModelRegistry(work / "registries" / TENANT)
    fake_model(registry)
    db_url = args.database_url or f"sqlite:///{work / 'cloud.db'}"
    engine = make_engine(db_url)
    migrate(engine)
    _, key = ApiKeys(engine).create(TENANT, "bench", "admin")
    engine.dispose()

    autosave_s = 60 if args.autosave == "periodic" else None
    slices = [
        (first, min(args.per_process, args.devices - first))
        for first in range(0, args.devices, args.per_process)
    ]
    with contextlib.ExitStack() as stack:
        brokers: list[LocalBroker] = []
        for b in range(len(slices)):
            bridge = bridge_lines(f"bench-{b}", brokers[0].port) if b else None
            broker = LocalBroker(workdir=work / f"mosquitto-{b}", autosave_s=autosave_s, extra=bridge)
            brokers.append(stack.enter_context(broker))
        settings = BrokerSettings(host=brokers[0].host, port=brokers[0].port)
        port = free_port()
        config = work / "cloud.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "database_url": db_url,
                    "registry_dir": str(work / "registries"),
                    "tenants": [TENANT],
                    "broker": settings.model_dump(),
                    "api": {"host": "127.0.0.1", "port": port},
                    "rollouts": {"tick_s": args.tick_s},
                }
            )
        )
        cloud = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cloud.cli",
                "cloud",
                "serve",
                "--config",
                str(config),
                "--log-level",
                "WARNING",
            ],
            stdout=subprocess.DEVNULL,
            stderr=(work / "cloud.log").open("wb"),
        )
        url = f"http://127.0.0.1:{port}"
        headers = {"authorization": f"Bearer {key}"}
        try:
            for _ in range(300):
                try:
                    ready = httpx.get(f"{url}/readyz", timeout=2)
                    # Ready and on the broker (readiness alone does not wait for the broker).
                    if ready.status_code == 200 and not ready.json().get("broker_offline"):
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            simulators = [
                subprocess.Popen(
                    [sys.executable, __file__, "--simulate", str(first), str(count), str(brokers[b].port)]
                )
                for b, (first, count) in enumerate(slices)
            ]
            for sim in simulators:
                stack.callback(stop_process, sim, grace_s=30)
            result = asyncio.run(
                rollout(
                    args.devices,
                    url,
                    headers,
                    cloud.pid,
                    args.give_up_after,
                    simulators,
                    args.console,
                    args.profile,
                )
            )
        finally:
            if cloud.poll() is not None:
                print(
                    f"the control plane exited early with code {cloud.returncode} (its log: {work / 'cloud.log'})"
                )
            stop_process(cloud, grace_s=60)

    print()
    print(f"machine: {platform.machine()} {os.cpu_count()} cpus; python {platform.python_version()}")
    print(
        f"database: {'PostgreSQL' if db_url.startswith('postgresql') else 'SQLite'}; broker: mosquitto on loopback"
    )
    print(f"broker autosave: {args.autosave}; rollout tick: {args.tick_s} s")
    print(
        f"devices: {args.devices} simulated, one MQTT session each, in {len(slices)} simulator process(es); "
        + (
            f"{len(slices)} brokers, the others bridged to the control plane's"
            if len(slices) > 1
            else "one broker"
        )
    )
    for k, v in result.items():
        print(f"{k:<44}{v}")


async def rollout(
    n: int,
    url: str,
    headers: dict[str, str],
    pid: int,
    give_up_s: float,
    simulators: list[subprocess.Popen[bytes]],
    console: bool = False,
    profile: Path | None = None,
) -> dict[str, Any]:
    """Once all ``n`` devices are known to the control plane: one rollout to all of them, timed,
    with the control plane's (process ``pid``) CPU and memory over it; with ``profile``, py-spy's
    samples of that window (py-spy's own CPU is not the control plane's)."""
    out: dict[str, Any] = {}
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as http:
        # The simulators are other processes: the control plane's device list says when all are in.
        while len((await http.get("/v1/devices")).json()["devices"]) < n:
            ended = [sim.returncode for sim in simulators if sim.poll() is not None]
            if ended:
                raise RuntimeError(f"a device simulator exited with code {ended[0]}")
            if time.perf_counter() - started > 600:
                raise RuntimeError(f"the {n} devices did not all connect within 600 s")
            await asyncio.sleep(0.5)
        print(
            f"{n} devices connected and known to the control plane in {time.perf_counter() - started:.1f}s",
            flush=True,
        )
        spy = (
            subprocess.Popen(  # noqa: ASYNC220 (started once, before the clock; it does not block)
                [
                    str(Path(sys.executable).with_name("py-spy")),
                    "record",
                    "--gil",
                    "--pid",
                    str(pid),
                    "-r",
                    "100",
                    "-f",
                    "raw",
                    "-o",
                    str(profile),
                ],
                stdout=subprocess.DEVNULL,
            )
            if profile
            else None
        )
        cpu0, _ = proc_stats(pid)
        try:
            peak = 0
            t0 = time.perf_counter()
            r = await http.post(
                "/v1/rollouts",
                json={"model": "bench-model:1", "waves": [100], "health_window_s": 0, "max_concurrent": n},
            )
            r.raise_for_status()
            rid = r.json()["rollout_id"]
            state = ""
            while state != "completed":
                if time.perf_counter() - t0 > give_up_s:
                    out["time to converge (POST → completed)"] = f"not converged after {give_up_s:.0f} s"
                    break
                await asyncio.sleep(0.25)
                # As a dashboard polls a large rollout: the wave counts, not 10,000 device entries.
                body = (await http.get(f"/v1/rollouts/{rid}", params={"devices": "false"})).json()
                state = body["state"]
                peak = max(peak, proc_stats(pid)[1])
                if state in ("halted", "aborted"):
                    raise RuntimeError(f"rollout ended {state}: {body['message']}")
            elapsed = time.perf_counter() - t0
            cpu1, rss = proc_stats(pid)
        finally:
            if spy is not None:
                spy.send_signal(signal.SIGINT)  # py-spy writes the profile as it stops
                await asyncio.to_thread(spy.wait, 60)
        if console:
            await console_timings(http, n, out)
    out.setdefault("time to converge (POST → completed)", f"{elapsed:.1f} s (goal < 30 s at 10,000)")
    out["control plane CPU over that window"] = (
        f"{cpu1 - cpu0:.1f} s ({(cpu1 - cpu0) / elapsed:.0%} of one core; "
        f"{(cpu1 - cpu0) / n * 1000:.2f} ms per device, goal ≤ 1)"
    )
    out["control plane peak resident memory"] = f"{max(peak, rss) / 2**20:.0f} MiB"
    return out


CONSOLE_QUERIES = {
    "fleet page, first 50 by id": "",
    "label selector site=s3": "?selector=site%3Ds3",
    "status online, newest first": "?status=online&sort=last_seen&order=desc",
    "page 10 of 50 per page": "?page=10",
    "200 per page, by model": "?per_page=200&sort=model",
    "search id sim-0099": "?q=sim-0099",
}


async def console_timings(http: httpx.AsyncClient, n: int, out: dict[str, Any], rounds: int = 30) -> None:
    """Label the devices (ten sites), sign in to the console, time the fleet page."""
    for i in range(n):
        r = await http.put(f"/v1/devices/sim-{i:05d}/labels", json={"labels": {"site": f"s{i % 10}"}})
        r.raise_for_status()
    key = http.headers["authorization"].split(" ", 1)[1]
    async with httpx.AsyncClient(base_url=str(http.base_url), timeout=60) as browser:
        form = await browser.get("/ui/login")
        token = re.search(r'name="login_token" value="([^"]+)"', form.text)
        assert token is not None, form.text[:500]
        signed = await browser.post("/ui/login", data={"api_key": key, "login_token": token.group(1)})
        assert signed.status_code == 303, signed.text[:500]
        for name, query in CONSOLE_QUERIES.items():
            server: list[float] = []
            client: list[float] = []
            for _ in range(rounds):
                t = time.perf_counter()
                r = await browser.get(f"/ui/fleet{query}")
                client.append((time.perf_counter() - t) * 1000)
                r.raise_for_status()
                server.append(float(r.headers["server-timing"].split("dur=")[1]))
            server.sort()
            client.sort()
            out[f"console {name} (ms, server p50/p95; client p50)"] = (
                f"{server[len(server) // 2]:.1f} / {server[int(len(server) * 0.95)]:.1f}; "
                f"{client[len(client) // 2]:.1f}"
            )


if __name__ == "__main__":
    main()
