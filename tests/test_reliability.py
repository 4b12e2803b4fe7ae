"""Nothing lost on an operator's bad day (issue 13): telemetry under steady traffic from three
devices reaches the database exactly once per request served while control-plane replicas are
SIGKILLed (one restarted, one gone for good) and while the broker is SIGKILLed and comes back
before the control plane does. Real mosquitto, real agents, real `autoglm cloud serve`.

Run alone: ``bash .ci/test.sh -m reliability``."""

from __future__ import annotations

import contextlib
import http.server
import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from cloud.mqtt.local_broker import LocalBroker
from cloud.plane.auth import ApiKeys
from cloud.plane.fleet import Fleet
from cloud.plane.store import make_engine
from cloud.registry import ModelRegistry, RegistryEntry
from shared.messages import DesiredState, Phase
from shared.mqtt import BrokerSettings
from shared.signing import SigningKey
from tests.conftest import DEVICE, BackgroundCloud, EdgeProcess, is_active
from tests.services import CloudProcess, eventually, start_cloud

pytestmark = [pytest.mark.slow, pytest.mark.reliability, pytest.mark.long]

DEVICES = [f"steady-{i}" for i in range(3)]
# Devices send again what the cloud has not acknowledged after this long (30 s by default), and
# ask again for chunks after this long without one (10 s): a request a killed replica took is
# lost with it. Both scaled to rollouts that take seconds here, not minutes.
FAST_RESEND = {
    "outbox": {"ack_timeout_s": 3.0},
    "telemetry": {"flush_interval_s": 0.2},
    "fetch": {"request_timeout_s": 2.0},
}


@contextmanager
def steady_traffic(edges: list[EdgeProcess], model: str = "demo-glm") -> Iterator[list[int]]:
    """One client per device, one short request after another; yields the served counts."""
    served = [0] * len(edges)
    stop = threading.Event()
    failures: list[str] = []

    def client(i: int, edge: EdgeProcess) -> None:
        with httpx.Client(base_url=edge.api, timeout=30) as http:
            while not stop.is_set():
                r = http.post("/v1/completions", json={"model": model, "prompt": "x = ", "max_tokens": 1})
                if r.status_code != 200 or r.headers.get("x-autoglm-served-by") != "local":
                    failures.append(f"{edge.api}: {r.status_code} {r.text[:200]}")
                    return
                served[i] += 1
                time.sleep(0.02)

    threads = [threading.Thread(target=client, args=(i, e), daemon=True) for i, e in enumerate(edges)]
    for t in threads:
        t.start()
    try:
        yield served
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not failures, failures


def _stored(url: str, tenant: str) -> dict[str, int]:
    engine = make_engine(url)
    try:
        fleet = Fleet(engine)
        return {d: fleet.telemetry_count(tenant, d) for d in DEVICES}
    finally:
        engine.dispose()


def _wait_stored(url: str, tenant: str, served: list[int], timeout: float = 90.0) -> dict[str, int]:
    """The stored counts once they equal ``served`` (else the last counts: the caller asserts)."""
    want = dict(zip(DEVICES, served, strict=True))
    last: list[dict[str, int]] = [{}]

    def equal() -> bool:
        last[0] = _stored(url, tenant)
        return last[0] == want

    with contextlib.suppress(AssertionError):
        eventually(equal, timeout, "every record served to be stored", interval=0.5)
    return last[0]


def _fleet_serving(
    cloud: CloudProcess,
    edge_factory: Callable[..., EdgeProcess],
    broker: BrokerSettings,
    tenant: str,
    trusted: list[str],
    model: str = "demo-glm:1",
) -> list[EdgeProcess]:
    edges = [
        edge_factory(device_id=d, tenant=tenant, broker=broker, trusted=trusted, extra=FAST_RESEND)
        for d in DEVICES
    ]
    cloud.wait(lambda: len(cloud.devices()) == len(DEVICES), 60, "the devices")
    r = cloud.ok("POST", "/v1/rollouts", {"model": model, "waves": [100], "health_window_s": 0})
    cloud.wait_rollout(r["rollout_id"], ("completed",))
    for e in edges:
        e.wait_ready()
    return edges


@pytest.fixture(scope="module")
def steady_versions(demo_source: Path, registry: ModelRegistry, signing_key: SigningKey) -> list[str]:
    """Three releases of a model of its own, fp32 in 64 KiB chunks, so that every wave of a
    rollout fetches many chunks through the control plane's shared fetch group."""
    from cloud.packaging.packager import ModelPackager, PackageOptions

    packager = ModelPackager(registry, signing_key)
    options = {"quantize": "none", "chunk_size": 64 * 1024}
    for version in ("1", "2", "3"):
        packager.package(demo_source, PackageOptions(name="steady-glm", version=version, **options))
    return ["steady-glm:1", "steady-glm:2", "steady-glm:3"]


ROLLOUT = {"waves": [34, 67, 100], "health_window_s": 2.0, "max_concurrent": 1}
# A lease a replica SIGKILLed for good holds is taken over after this long (15 s by default).
SHORT_LEASE = {"rollouts": {"tick_s": 0.3, "lease_s": 2.0}}


def _rollout_state(url: str, rid: str) -> str:
    """Read from the database: the replica that created the rollout may be dead by now."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return str(
                conn.execute(
                    text("SELECT state FROM rollouts WHERE rollout_id = :id"), {"id": rid}
                ).scalar_one()
            )
    finally:
        engine.dispose()


def _timed_rollout(cloud: CloudProcess, url: str, model: str, during: Callable[[], None]) -> float:
    """Seconds from creating the rollout to its completion, with ``during`` run meanwhile."""
    started = time.monotonic()
    rid = cloud.ok("POST", "/v1/rollouts", {"model": model, **ROLLOUT})["rollout_id"]
    during()
    deadline = started + 180
    while (state := _rollout_state(url, rid)) != "completed":
        assert state in ("pending", "running") and time.monotonic() < deadline, state
        time.sleep(0.2)
    return time.monotonic() - started


def test_telemetry_survives_replicas_killed_restarted_and_gone(
    postgres_url: str,
    tmp_path: Path,
    broker_settings: BrokerSettings,
    tenant: str,
    registry: ModelRegistry,
    signing_key: SigningKey,
    steady_versions: list[str],
    edge_factory: Callable[..., EdgeProcess],
) -> None:
    """Items 1 and 9: two replicas share the telemetry and fetch groups. A rollout runs
    undisturbed; the next one runs while A is SIGKILLed and restarted and then B is SIGKILLed for
    good. Every record served is stored, none twice, and the disturbed rollout takes at most 1.5x
    the undisturbed one (a dead replica's share of fetch requests goes to the live one)."""
    a = start_cloud(
        tmp_path / "a",
        postgres_url,
        broker_settings,
        tenant,
        registry,
        replica_id="replica-a",
        extra=SHORT_LEASE,
    )
    b = start_cloud(
        tmp_path / "b",
        postgres_url,
        broker_settings,
        tenant,
        registry,
        replica_id="replica-b",
        key=a.key,
        extra=SHORT_LEASE,
    )
    clouds = [a, b]
    first, second, third = steady_versions
    try:
        edges = _fleet_serving(a, edge_factory, broker_settings, tenant, [signing_key.public.b64], first)
        before = _wait_stored(postgres_url, tenant, [0, 0, 0], timeout=1)

        def kill_a_restart_it_then_kill_b() -> None:
            nonlocal a
            time.sleep(1)
            a.proc.kill()
            a.proc.wait(10)
            a = start_cloud(
                tmp_path / "a2",
                postgres_url,
                broker_settings,
                tenant,
                registry,
                replica_id="replica-a",
                key=b.key,
                extra=SHORT_LEASE,
            )
            clouds.append(a)
            time.sleep(1)
            b.proc.kill()
            b.proc.wait(10)

        with steady_traffic(edges, "steady-glm") as served:
            time.sleep(1)
            undisturbed = _timed_rollout(b, postgres_url, second, lambda: None)
            disturbed = _timed_rollout(b, postgres_url, third, kill_a_restart_it_then_kill_b)
            time.sleep(2)
        print(f"rollout: {undisturbed:.1f} s undisturbed, {disturbed:.1f} s with the replicas killed")
        total = [s + before[d] for s, d in zip(served, DEVICES, strict=True)]
        assert sum(served) > 60, served
        stored = _wait_stored(postgres_url, tenant, total)
        assert stored == dict(zip(DEVICES, total, strict=True)), (stored, total)
        for e in edges:
            assert httpx.get(f"{e.api}/v1/agent", timeout=10).json()["outbox"]["depth"] == 0
        assert {d["active_model"] for d in a.devices().values()} == {third}
        assert disturbed <= 1.5 * undisturbed, (disturbed, undisturbed)
    finally:
        for c in clouds:
            c.stop()


def test_telemetry_survives_a_broker_crash_with_the_devices_back_before_the_cloud(
    private_broker: LocalBroker,
    tmp_path: Path,
    tenant: str,
    registry: ModelRegistry,
    signing_key: SigningKey,
    demo_package: RegistryEntry,
    edge_factory: Callable[..., EdgeProcess],
) -> None:
    """Item 8: mosquitto SIGKILLed mid-traffic; the devices reconnect and send for 10 s before the
    control plane is back (a broker restores no shared subscription, and the cloud's session
    ended with its connection): every record served still reaches the database once."""
    url = f"sqlite:///{tmp_path / 'cp.sqlite3'}"
    broker = BrokerSettings(
        host=private_broker.host, port=private_broker.port, reconnect_initial_s=0.2, reconnect_max_s=1.0
    )
    cloud = start_cloud(tmp_path / "c1", url, broker, tenant, registry, replica_id="solo")
    clouds = [cloud]
    try:
        edges = _fleet_serving(cloud, edge_factory, broker, tenant, [signing_key.public.b64])
        with steady_traffic(edges) as served:
            time.sleep(2)
            private_broker.kill()
            cloud.proc.kill()
            cloud.proc.wait(10)
            time.sleep(1)
            private_broker.start()
            deadline = time.monotonic() + 30
            while not all(httpx.get(f"{e.api}/v1/agent", timeout=10).json()["online"] for e in edges):
                assert time.monotonic() < deadline, "the devices did not reconnect"
                time.sleep(0.2)
            time.sleep(10)  # the devices send; nobody in the cloud listens yet
            cloud = start_cloud(
                tmp_path / "c2", url, broker, tenant, registry, replica_id="solo", key=cloud.key
            )
            clouds.append(cloud)
            time.sleep(3)
        stored = _wait_stored(url, tenant, served)
        assert stored == dict(zip(DEVICES, served, strict=True)), (stored, served)
    finally:
        for c in clouds:
            c.stop()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """The agent's data folder on a 48 MiB tmpfs of its own (root mounts it, as CI runs)."""
    data = tmp_path / f"edge-{DEVICE}"
    data.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(data)], check=True)
    try:
        yield data
    finally:
        subprocess.run(["umount", "-l", str(data)], check=False)


def test_a_disk_that_fills_mid_fetch_is_reported_survived_and_recovered(
    small_disk: Path,
    demo_package: RegistryEntry,
    demo_package_v2: RegistryEntry,
    edge_factory: Callable[..., EdgeProcess],
    broker_settings: BrokerSettings,
    tenant: str,
    registry: ModelRegistry,
    signing_key: SigningKey,
) -> None:
    """Items 2-4: the data folder fills while version 2 downloads. The failure is reported as
    no_space with the numbers, every local request is still answered 200 (telemetry that cannot
    be stored is dropped and counted), the agent stays alive, and once space is freed the next
    desired state installs, resuming the partial download."""
    slow = {"fetch": {"max_bytes_per_s": 256 * 1024, "request_timeout_s": 2.0}}
    edge = edge_factory(
        device_id=DEVICE, tenant=tenant, broker=broker_settings, trusted=[signing_key.public.b64], extra=slow
    )
    filler = small_disk / "filler"
    with BackgroundCloud(broker_settings, tenant, registry) as cloud:
        cloud.set_desired(DEVICE, DesiredState(revision=1, model=demo_package.ref))
        cloud.wait_reported(DEVICE, is_active(demo_package, 1))
        edge.wait_ready()
        assert shutil.disk_usage(small_disk).free > demo_package_v2.manifest.total_size

        before = httpx.get(f"{edge.api}/v1/agent", timeout=10).json()["fetch"]["bytes_received"]
        cloud.set_desired(DEVICE, DesiredState(revision=2, model=demo_package_v2.ref))
        cloud.wait_reported(DEVICE, lambda r: r.phase == Phase.FETCHING and r.target_revision == 2)
        deadline = time.monotonic() + 30
        while (
            httpx.get(f"{edge.api}/v1/agent", timeout=10).json()["fetch"]["bytes_received"]
            < before + 256 * 1024
        ):
            assert time.monotonic() < deadline, "the download did not start"
            time.sleep(0.1)
        _fill(filler)
        failed = cloud.wait_reported(DEVICE, lambda r: r.phase == Phase.FAILED, timeout=60)
        assert failed.last_error is not None and failed.last_error.code == "no_space", failed.last_error
        assert "bytes free" in failed.last_error.message
        assert failed.slots[failed.active_slot or "a"] == demo_package.ref

        with httpx.Client(base_url=edge.api, timeout=30) as http:
            for i in range(20):
                r = http.post(
                    "/v1/completions", json={"model": "demo-glm", "prompt": f"x{i}", "max_tokens": 2}
                )
                assert r.status_code == 200, r.text
            assert http.get("/healthz").status_code == 200
            agent = http.get("/v1/agent").json()
        assert agent["outbox"]["lost"] > 0  # the disk was full: dropped, counted, never a 500

        filler.unlink()
        cloud.set_desired(DEVICE, DesiredState(revision=3, model=demo_package_v2.ref))
        cloud.wait_reported(DEVICE, is_active(demo_package_v2, 3), timeout=120)
    assert "resuming" in edge.log_text()


def _fill(path: Path) -> None:
    """Take every free byte of the file system ``path`` is on."""
    with path.open("wb", buffering=0) as fh:
        for block in (1024 * 1024, 4096, 1):
            try:
                while True:
                    fh.write(b"\0" * block)
            except OSError:
                continue
    assert shutil.disk_usage(path.parent).free < 4096


class _BreakingUpstream(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible upstream that dies mid-stream: two events, then the connection drops
    (what a SIGKILLed replica looks like from the other end of the socket)."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = json.dumps({"object": "list", "data": [{"id": "demo-glm", "object": "model"}]}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", "0")))
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for word in ("Hello", " wor"):
            event = {
                "id": "c1",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": "demo-glm",
                "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}],
            }
            data = b"data: " + json.dumps(event).encode() + b"\n\n"
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b'1f\r\ndata: {"id": "c1", "obj')  # half an event, then gone
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def breaking_upstream() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BreakingUpstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def _stream_raises(base_url: str, key: str) -> str:
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0)
    text = ""
    with pytest.raises(openai.APIError) as broke:  # noqa: PT012 (the stream breaks while it is read)
        for chunk in client.chat.completions.create(
            model="demo-glm", messages=[{"role": "user", "content": "hi"}], stream=True
        ):
            text += chunk.choices[0].delta.content or ""
    assert "broke off" in str(broke.value), broke.value
    return text


def test_streams_that_break_upstream_end_with_an_error_the_client_raises(
    breaking_upstream: str,
    tmp_path: Path,
    broker_settings: BrokerSettings,
    tenant: str,
    registry: ModelRegistry,
    signing_key: SigningKey,
    edge_factory: Callable[..., EdgeProcess],
) -> None:
    """Item 5: through the gateway and through the edge's cloud passthrough, a stream whose
    upstream dies mid-answer ends in an error event (no [DONE]); the gateway marks the replica
    down and counts the break."""
    db = f"sqlite:///{tmp_path / 'cloud.db'}"
    cloud = start_cloud(
        tmp_path,
        db,
        broker_settings,
        tenant,
        registry,
        extra={
            "gateway": {"upstreams": [{"url": breaking_upstream, "name": "fragile"}], "health_interval_s": 60}
        },
    )
    try:
        engine = make_engine(db)
        _, key = ApiKeys(engine).create(tenant, "app", "inference")
        engine.dispose()
        assert _stream_raises(f"{cloud.url}/v1", key) == "Hello wor"
        state = cloud.ok("GET", "/v1/gateway")
        assert state["stream_breaks"] == 1
        assert [(r["name"], r["up"]) for r in state["replicas"]] == [("fragile", False)]
    finally:
        cloud.stop()

    edge = edge_factory(
        device_id=DEVICE,
        tenant=tenant,
        broker=broker_settings,
        trusted=[signing_key.public.b64],
        extra={"router": {"policy": "cloud_only", "cloud_url": breaking_upstream}},
    )
    edge.wait_http("/healthz", 60)
    assert _stream_raises(f"{edge.api}/v1", "unused") == "Hello wor"
    deadline = time.monotonic() + 10  # the agent's log reaches us through a reader thread
    while "a stream from the cloud broke off" not in edge.log_text():
        assert time.monotonic() < deadline, edge.log_text()[-2000:]
        time.sleep(0.1)


def test_health_is_judged_by_receive_time_without_client_side_events(tmp_path: Path) -> None:
    """Item 6, the logic: records dated two hours back (a device clock behind) count in a window
    that opened a minute ago by the cloud's clock; full queues and departed clients are not the
    model's errors; the skew is stored."""
    from datetime import UTC, datetime, timedelta

    from cloud.plane.store import migrate
    from shared.messages import TelemetryBatch, TelemetryRecord
    from tests.factories import make_telemetry_record

    engine = make_engine(f"sqlite:///{tmp_path / 'cp.sqlite3'}")
    migrate(engine)
    fleet = Fleet(engine)
    behind = datetime.now(UTC) - timedelta(hours=2)

    def rec(i: int, error: str | None) -> TelemetryRecord:
        return make_telemetry_record(
            id=f"rec-{i:06d}", at=behind, model="m:2", latency_ms=10.0, ok=error is None, error=error
        )

    errors = ["internal_error"] * 5 + ["queue_full"] * 20 + ["stream_interrupted"] * 20 + [None] * 5
    fleet.record_telemetry(
        "t", TelemetryBatch(device_id="d", records=[rec(i, e) for i, e in enumerate(errors)])
    )
    n, failed, _ = fleet.health("t", "d", "m:2", datetime.now(UTC) - timedelta(minutes=1))
    assert (n, failed) == (10, 5)  # judged on its real traffic: 50 % model errors
    from sqlalchemy import select

    from cloud.plane.store import devices

    with engine.connect() as conn:
        skew = conn.execute(select(devices.c.clock_skew_s)).scalar_one()
    assert 7100 < skew < 7300
    engine.dispose()


def test_a_device_clock_hours_behind_is_judged_on_its_real_traffic(
    tmp_path: Path,
    broker_settings: BrokerSettings,
    tenant: str,
    registry: ModelRegistry,
    signing_key: SigningKey,
    demo_package: RegistryEntry,
    edge_factory: Callable[..., EdgeProcess],
) -> None:
    """Item 6, for real: the agent runs under libfaketime two hours behind. A rollout that needs
    5 requests per device to judge it holds the wave until they came, then judges the device
    healthy on them (by device time it would have seen none)."""
    lib = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
    assert lib.is_file(), "Debian's faketime is installed by .ci/bootstrap.sh"
    cloud = start_cloud(
        tmp_path / "cloud", f"sqlite:///{tmp_path / 'cp.sqlite3'}", broker_settings, tenant, registry
    )
    try:
        edge = edge_factory(
            device_id=DEVICE,
            tenant=tenant,
            broker=broker_settings,
            trusted=[signing_key.public.b64],
            extra=FAST_RESEND,
            env={"LD_PRELOAD": str(lib), "FAKETIME": "-2h", "FAKETIME_DONT_FAKE_MONOTONIC": "1"},
        )
        cloud.wait(lambda: DEVICE in cloud.devices(), 60, "the device")
        r = cloud.ok(
            "POST",
            "/v1/rollouts",
            {
                "model": "demo-glm:1",
                "waves": [100],
                "health_window_s": 1.0,
                "min_samples": 5,
                "wave_timeout_s": 120,
            },
        )
        cloud.wait(
            lambda: cloud.rollout(r["rollout_id"])["devices"][0]["state"] == "active", 60, "activation"
        )
        time.sleep(2)
        assert cloud.rollout(r["rollout_id"])["state"] == "running"  # no traffic yet: unknown, holding
        with httpx.Client(base_url=edge.api, timeout=30) as http:
            for i in range(8):
                assert (
                    http.post(
                        "/v1/completions", json={"model": "demo-glm", "prompt": f"{i}", "max_tokens": 1}
                    ).status_code
                    == 200
                )
        done = cloud.wait_rollout(r["rollout_id"], ("completed",))
        [device] = done["devices"]
        assert device["state"] == "healthy" and int(device["detail"].split()[0]) >= 5, device
    finally:
        cloud.stop()


def test_abandoned_requests_free_the_generator_at_once(
    demo_package: RegistryEntry,
    edge_factory: Callable[..., EdgeProcess],
    broker_settings: BrokerSettings,
    tenant: str,
    registry: ModelRegistry,
    signing_key: SigningKey,
) -> None:
    """Item 7: twenty non-streaming requests for 400 tokens whose clients give up after 0.3 s are
    cancelled (as vLLM does); the next request starts at once instead of after all of them."""
    import concurrent.futures

    from tests.conftest import serving_edge

    edge = serving_edge(
        edge_factory,
        broker=broker_settings,
        tenant=tenant,
        registry=registry,
        trusted=[signing_key.public.b64],
        model=demo_package,
        extra={"runtime": {"queue_size": 32}},
    )
    body = {
        "model": "demo-glm",
        "prompt": "import os\n\n\ndef main():\n",
        "max_tokens": 400,
        "temperature": 0,
    }
    with httpx.Client(base_url=edge.api, timeout=60) as http:
        started = time.perf_counter()
        full = http.post("/v1/completions", json={**body, "max_tokens": 100})
        made = full.json()["usage"]["completion_tokens"]
        per_token = (time.perf_counter() - started) / made
    assert made >= 50, "the prompt must make long answers, or nothing here is abandoned"

    def abandon(_: int) -> None:
        with contextlib.suppress(httpx.TimeoutException):
            httpx.post(f"{edge.api}/v1/completions", json=body, timeout=0.3)

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        list(pool.map(abandon, range(20)))
    started = time.perf_counter()
    r = httpx.post(f"{edge.api}/v1/completions", json={**body, "max_tokens": 1}, timeout=60)
    waited = time.perf_counter() - started
    assert r.status_code == 200
    # Twenty 400-token generations would take 20 × 400 × per_token; one token and a request's
    # overhead is what is left.
    assert waited < 1.0 + 5 * per_token, (waited, per_token)
    agent = httpx.get(f"{edge.api}/v1/agent", timeout=10).json()
    assert agent["queue"]["waiting"] == 0
