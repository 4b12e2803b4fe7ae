"""Shared fixtures: real mosquitto on a free port, the packaged demo model, edge agents as processes."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from cloud.blob_server import BlobServer
from cloud.control_link import ControlLink, DeviceView
from cloud.local_broker import LocalBroker, free_port
from cloud.processes import stop_process
from cloud.registry import ModelRegistry, RegistryEntry
from shared.messages import DesiredState, ReportedState
from shared.mqtt import QOS, BrokerSettings, make_client
from shared.signing import SigningKey
from shared.topics import Topics

REPO = Path(__file__).resolve().parents[1]
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

    cache = Path(os.environ.get("AUTOGLM_TEST_CACHE", Path.home() / ".cache" / "autoglm-tests"))
    folder = cache / f"demo-{_demo_cache_key()}"
    if not (folder / "config.json").is_file():
        tmp = tmp_path_factory.mktemp("demo-build")
        build_demo_model(tmp / "model", DemoModelSpec(train_steps=TEST_DEMO_STEPS))
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(tmp / "model", folder)
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


@dataclass
class EdgeProcess:
    """An edge agent running as its own OS process, as on a device."""

    proc: subprocess.Popen[str]
    api: str
    config: Path
    data_dir: Path
    lines: list[str] = field(default_factory=list)

    def log_text(self) -> str:
        return "\n".join(self.lines)

    def wait_http(self, path: str = "/readyz", timeout: float = 120.0) -> dict[str, Any]:
        """Poll ``path`` until it answers 200; fail with the agent's log if it never does."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"edge agent exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}"
                )
            try:
                r = httpx.get(f"{self.api}{path}", timeout=2)
                if r.status_code == 200:
                    body: dict[str, Any] = r.json()
                    return body
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"edge agent {path} not 200 in {timeout}s:\n{self.log_text()[-4000:]}")

    def wait_ready(self, timeout: float = 120.0) -> dict[str, Any]:
        return self.wait_http("/readyz", timeout)

    def stop(self) -> None:
        stop_process(self.proc)


def start_edge(
    tmp: Path,
    *,
    device_id: str,
    tenant: str,
    broker: BrokerSettings,
    trusted: list[str],
    command: list[str] | None = None,
    api_key: str | None = None,
) -> EdgeProcess:
    port = free_port()
    data_dir = tmp / f"edge-{device_id}"
    config = tmp / f"edge-{device_id}.yaml"
    settings = {
        "device_id": device_id,
        "tenant": tenant,
        "data_dir": str(data_dir),
        "broker": broker.model_dump(),
        "trusted_keys": trusted,
        "api": {"host": "127.0.0.1", "port": port, "api_key": api_key},
        "fetch": {"request_timeout_s": 2.0},
        "runtime": {"threads": 1},
    }
    config.write_text(yaml.safe_dump(settings))
    cmd = command or [sys.executable, "-m", "cloud.cli"]
    proc = subprocess.Popen(
        [*cmd, "edge", "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    edge = EdgeProcess(proc, f"http://127.0.0.1:{port}", config, data_dir)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            edge.lines.append(line.rstrip())

    threading.Thread(target=pump, daemon=True, name=f"log-{device_id}").start()
    return edge


@pytest.fixture
def edge_factory(tmp_path: Path) -> Iterator[Callable[..., EdgeProcess]]:
    """Start edge agents (keyword arguments of ``start_edge``); all are stopped after the test."""
    started: list[EdgeProcess] = []

    def make(**kwargs: Any) -> EdgeProcess:
        edge = start_edge(tmp_path, **kwargs)
        started.append(edge)
        return edge

    yield make
    for e in started:
        e.stop()


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
                BlobServer(self.registry.blobs, self.topics),
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

                await link.wait_for(done, timeout)
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
