"""Services the tests run as real processes: the control plane and pool replicas."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml

from cloud.mqtt.local_broker import free_port
from cloud.plane.auth import ApiKeys
from cloud.plane.store import make_engine, migrate
from cloud.processes import stop_process
from cloud.registry import ModelRegistry
from shared.control import ControlSigner
from shared.mqtt import BrokerSettings
from shared.signing import SigningKey

T = TypeVar("T")


def eventually(
    probe: Callable[[], T],
    timeout: float = 30.0,
    what: str = "the condition",
    *,
    interval: float = 0.1,
    context: Callable[[], str] | None = None,
) -> T:
    """The first truthy value ``probe()`` returns, polled every ``interval`` seconds. An exception
    raised by ``probe`` means "not yet". After ``timeout`` an AssertionError names ``what``, the
    last value or exception, and ``context()`` (a process's log, say). The one way tests wait."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = probe()
            if value:
                return value
            last = value
        except AssertionError:
            raise
        except Exception as exc:  # not ready yet: a refused connection, a missing row
            last = exc
        if time.monotonic() >= deadline:
            extra = f"\n{context()}" if context else ""
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; last: {last!r}{extra}")
        time.sleep(interval)


async def until(
    condition: Callable[[], bool],
    seconds: float = 10.0,
    what: str = "the condition",
    *,
    interval: float = 0.01,
) -> None:
    """``eventually`` for a test running on an event loop: polls ``condition`` every ``interval``
    seconds with the loop free between polls (the tasks it waits for run on it)."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {seconds:g}s waiting for {what}")
        await asyncio.sleep(interval)


# The control key of every control plane and test cloud in this session; edges pin it by default.
CONTROL_KEY = SigningKey.generate()
CONTROL_SIGNER = ControlSigner(CONTROL_KEY)


def control_key_file(folder: Path) -> Path:
    """The session's control key as a PEM file in ``folder`` (for `autoglm cloud serve`)."""
    path = folder / "control-signing.pem"
    if not path.exists():
        CONTROL_KEY.save(path)
    return path


class Service:
    """A server of ours as its own OS process, its output collected in ``lines``."""

    def __init__(
        self, cmd: list[str], url: str, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> None:
        self.url = url
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())

    def log_text(self) -> str:
        return "\n".join(self.lines)

    def wait(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        eventually(check, timeout, what, interval=0.25, context=lambda: "\n".join(self.lines[-40:]))

    def wait_http(self, path: str = "/readyz", timeout: float = 120.0) -> dict[str, Any]:
        """Poll ``path`` until it answers 200; fail with the process's log if it never does."""

        def answered() -> dict[str, Any] | None:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.proc.args} exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}"
                )
            r = httpx.get(f"{self.url}{path}", timeout=2)
            body: dict[str, Any] | None = r.json() if r.status_code == 200 else None
            return body

        return eventually(
            answered,
            timeout,
            f"{self.url}{path} to answer 200",
            interval=0.2,
            context=lambda: self.log_text()[-4000:],
        )

    def wait_ready(self, timeout: float = 120.0) -> dict[str, Any]:
        return self.wait_http("/readyz", timeout)

    def stop(self) -> None:
        stop_process(self.proc)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


class CloudProcess(Service):
    def wait_ready(self, timeout: float = 120.0) -> dict[str, Any]:
        """Ready, and connected to the broker (readiness alone does not wait for it)."""

        def connected() -> dict[str, Any] | None:
            body = self.wait_http("/readyz", timeout)
            return None if body["broker_offline"] else body

        return eventually(connected, timeout, "the control plane to connect to the broker", interval=0.1)

    def __init__(self, cmd: list[str], url: str, key: str) -> None:
        super().__init__(cmd, url)
        self.key = key

    def api(
        self, method: str, path: str, body: dict[str, Any] | None = None, key: str | None = None
    ) -> httpx.Response:
        return httpx.request(
            method,
            f"{self.url}{path}",
            json=body,
            headers={"authorization": f"Bearer {key or self.key}"},
            timeout=30,
        )

    def ok(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        r = self.api(method, path, body)
        assert r.status_code < 300, f"{method} {path}: {r.status_code} {r.text}\n" + "\n".join(
            self.lines[-30:]
        )
        return r.json()

    def rollout(self, rid: str) -> dict[str, Any]:
        result: dict[str, Any] = self.ok("GET", f"/v1/rollouts/{rid}")
        return result

    def wait_rollout(self, rid: str, states: tuple[str, ...], timeout: float = 120) -> dict[str, Any]:
        self.wait(lambda: self.rollout(rid)["state"] in states, timeout, f"rollout {rid} to reach {states}")
        return self.rollout(rid)

    def devices(self) -> dict[str, dict[str, Any]]:
        return {d["device_id"]: d for d in self.ok("GET", "/v1/devices")["devices"]}


def scrape_metrics(url: str) -> dict[str, float]:
    """``{url}/metrics`` as {sample name with labels: value}."""
    out = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def cli(
    cloud: CloudProcess, *args: str, key: str | None = None, columns: int = 200, **env_vars: str
) -> subprocess.CompletedProcess[str]:
    """The CLI against ``cloud`` as a script runs it (output to a pipe, ``columns`` wide);
    ``env_vars`` override the environment (AUTOGLM_URL, …)."""
    env = {
        **os.environ,
        "AUTOGLM_URL": cloud.url,
        "AUTOGLM_API_KEY": key or cloud.key,
        "COLUMNS": str(columns),
        **env_vars,
    }
    return subprocess.run(
        [sys.executable, "-m", "cloud.cli", *args], capture_output=True, text=True, env=env, timeout=120
    )


def start_cloud(
    tmp: Path,
    database_url: str,
    broker: BrokerSettings,
    tenant: str,
    registry: ModelRegistry,
    replica_id: str = "replica-a",
    key: str | None = None,
    extra: dict[str, Any] | None = None,
) -> CloudProcess:
    """``autoglm cloud serve`` on a free port; ``extra`` is merged into the config's top level."""
    tmp.mkdir(parents=True, exist_ok=True)
    registries = tmp / "registries"
    registries.mkdir(exist_ok=True)
    (registries / tenant).symlink_to(registry.root)
    port = free_port()
    config = tmp / "cloud.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "database_url": database_url,
                "registry_dir": str(registries),
                "tenants": [tenant],
                "broker": broker.model_dump(mode="json"),
                "api": {"host": "127.0.0.1", "port": port},
                "rollouts": {"tick_s": 0.3, "lease_s": 5.0},
                "replica_id": replica_id,
                "control": {"key_file": str(control_key_file(tmp))},
                **(extra or {}),
            }
        )
    )
    if key is None:
        engine = make_engine(database_url)
        migrate(engine)
        _, key = ApiKeys(engine).create(tenant, "test", "admin")
        engine.dispose()
    cloud = CloudProcess(
        [sys.executable, "-m", "cloud.cli", "cloud", "serve", "--config", str(config)],
        f"http://127.0.0.1:{port}",
        key,
    )
    cloud.wait_ready(60)
    return cloud


def start_pool(
    model_dir: Path,
    *,
    name: str = "demo-glm",
    version: str | None = None,
    max_batch: int = 16,
    threads: int = 1,
    port: int | None = None,
) -> Service:
    """``autoglm pool serve`` on ``port`` (a free one by default), ready to answer."""
    port = port or free_port()
    pool = Service(
        [
            sys.executable,
            "-m",
            "cloud.cli",
            "pool",
            "serve",
            "--model",
            str(model_dir),
            "--name",
            name,
            "--port",
            str(port),
            "--max-batch",
            str(max_batch),
            "--threads",
            str(threads),
            *(["--version", version] if version else []),
        ],
        f"http://127.0.0.1:{port}",
    )
    pool.wait_ready()
    return pool
