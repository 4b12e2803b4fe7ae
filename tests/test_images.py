"""The container images, built and run: control plane, pool and edge on a Debian base made here.

Nothing can be pulled from an image registry, so the base comes from Debian's packages
(debootstrap, then ``docker import``) with Python in a build stage; every Dockerfile takes its
base as ``--build-arg BASE``. The images run with ``--network host`` against the test's own
mosquitto: the control plane (as its non-root user, health check passing) rolls the demo model
out to the edge container over MQTT, the edge answers a chat request, and the pool container
answers one too, directly and through the control plane's gateway.

Long (image builds take minutes): ``bash .ci/test-images.sh``. Needs root (dockerd, debootstrap);
``.ci/test-images.sh`` installs Debian's docker.io and debootstrap and starts dockerd as the issue
that added this test describes: ``--bridge=none --iptables=false --ip-forward=false``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from cloud.mqtt.local_broker import free_port
from cloud.plane.auth import ApiKeys
from cloud.plane.store import make_engine, migrate
from cloud.registry import ModelRegistry, RegistryEntry
from shared.mqtt import BrokerSettings
from shared.signing import SigningKey
from tests.services import CONTROL_KEY, eventually

pytestmark = [pytest.mark.images, pytest.mark.timeout(3600)]

REPO = Path(__file__).resolve().parents[1]
BASE = "autoglm-test/python:3.11"
DEBIAN = "autoglm-test/debian:bookworm"
UID = 10001  # the images' user
HOST_CA = Path(os.environ.get("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt"))


def _docker(*args: str, timeout: float = 1800, check: bool = True) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"docker {' '.join(args[:3])}: {r.stderr[-3000:] or r.stdout[-3000:]}")
    return r


@pytest.fixture(scope="module")
def docker() -> None:
    if shutil.which("docker") is None or _docker("info", check=False, timeout=60).returncode != 0:
        pytest.fail("no Docker engine: run bash .ci/test-images.sh (it installs and starts dockerd)")


@pytest.fixture(scope="module")
def base_image(docker: None, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Debian bookworm from Debian's mirror, and Python 3.11 with pip on it (as python:3.11-slim)."""
    if _docker("image", "inspect", DEBIAN, check=False).returncode != 0:
        root = tmp_path_factory.mktemp("debian-root")
        subprocess.run(
            ["debootstrap", "--variant=minbase", "bookworm", str(root), "http://deb.debian.org/debian"],
            check=True,
            capture_output=True,
            timeout=900,
        )
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(["docker", "import", "-", DEBIAN], stdin=tar.stdout, check=True, capture_output=True)
        tar.wait()
    context = tmp_path_factory.mktemp("python-base")
    # The host's CA bundle travels along: where PyPI is reached through a TLS-inspecting proxy
    # (as on the machines this project is built on), pip in the builds must trust what the host trusts.
    shutil.copy(HOST_CA, context / "host-ca.crt")
    (context / "Dockerfile").write_text(
        f"FROM {DEBIAN}\n"
        "RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates"
        " && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/python\n"
        "COPY host-ca.crt /etc/ssl/certs/host-ca.crt\n"
        "ENV PATH=/opt/python/bin:$PATH PIP_CERT=/etc/ssl/certs/host-ca.crt SSL_CERT_FILE=/etc/ssl/certs/host-ca.crt\n"
    )
    _docker("build", "--network", "host", "-q", "-t", BASE, str(context))
    return BASE


@pytest.fixture(scope="module")
def wheels() -> Iterator[str]:
    """The CPU build of torch, served over HTTP for the pool image's build (PyPI's default torch
    is the multi-GB CUDA build)."""
    folder = Path("/opt/wheels")
    if not list(folder.glob("torch-2.13.0*.whl")):
        folder = Path(os.environ.get("AUTOGLM_WHEELS", Path.home() / ".cache" / "autoglm-wheels"))
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "torch==2.13.0", "-d", str(folder)],
            check=True,
            capture_output=True,
            timeout=1800,
        )
    port = free_port()
    server = ThreadingHTTPServer(
        ("127.0.0.1", port), partial(SimpleHTTPRequestHandler, directory=str(folder))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{port}/"
    server.shutdown()


def _build(name: str, base: str, *build_args: str) -> str:
    tag = f"autoglm/{name}:test"
    args = ["build", "--network", "host", "-f", f"manifests/images/{name}.Dockerfile", "-t", tag]
    args += ["--build-arg", f"BASE={base}"]
    for a in build_args:
        args += ["--build-arg", a]
    _docker(*args, str(REPO), timeout=3600)
    return tag


class Container:
    def __init__(self, image: str, name: str, args: list[str], mounts: dict[Path, str]) -> None:
        self.name = name
        volumes = [x for host, inside in mounts.items() for x in ("-v", f"{host}:{inside}")]
        _docker("rm", "-f", name, check=False)
        _docker("run", "-d", "--name", name, "--network", "host", *volumes, image, *args)

    def logs(self) -> str:
        r = _docker("logs", "--tail", "60", self.name, check=False)
        return r.stdout + r.stderr

    def inspect(self) -> dict[str, Any]:
        state: dict[str, Any] = json.loads(_docker("inspect", self.name).stdout)[0]
        return state

    def wait_healthy(self, timeout: float = 240) -> None:
        def healthy() -> bool:
            state = self.inspect()["State"]
            assert state["Running"], f"{self.name} exited:\n{self.logs()}"
            return bool(state.get("Health", {}).get("Status") == "healthy")

        eventually(healthy, timeout, f"{self.name} to report healthy\n{self.logs()}")

    def user(self) -> str:
        return _docker("exec", self.name, "id", "-u").stdout.strip()

    def remove(self) -> None:
        _docker("rm", "-f", self.name, check=False)


def _free(port: int) -> int:
    """The image's own port (its HEALTHCHECK probes it), which must be free on the host: the
    containers share the host's network."""
    import socket

    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            pytest.fail(f"port {port} is taken on this host; the image's health check needs it")
    return port


def _shared(path: Path, owner: bool = False) -> Path:
    """A folder the image's user can read (and, with ``owner``, write)."""
    path.mkdir(parents=True, exist_ok=True)
    if owner:
        for p in [path, *path.rglob("*")]:
            os.chown(p, UID, UID)
    for p in [path, *path.rglob("*")]:
        p.chmod(p.stat().st_mode | 0o555 if p.is_dir() else p.stat().st_mode | 0o444)
    return path


def test_images_build_and_run_as_their_user_a_model_rolls_out_and_answers(
    base_image: str,
    wheels: str,
    tmp_path: Path,
    broker_settings: BrokerSettings,
    tenant: str,
    registry: ModelRegistry,
    signing_key: SigningKey,
    demo_package: RegistryEntry,
    demo_source: Path,
) -> None:
    cloud_image = _build("cloud", base_image)
    edge_image = _build("edge", base_image)
    pool_image = _build("pool", base_image, "PYTHON=python3", f"PIP_FIND_LINKS={wheels}")
    # Each image: its entrypoint is the CLI, it holds no torch where it must not.
    for image in (cloud_image, edge_image):
        r = _docker("run", "--rm", "--entrypoint", "python", image, "-c", "import torch", check=False)
        assert r.returncode != 0, f"{image} carries torch"

    containers: list[Container] = []
    try:
        # -- the pool: the demo model's Hugging Face folder, on CPU ---------------------------
        models = _shared(tmp_path / "models")
        shutil.copytree(demo_source, models / "current")
        _shared(models)
        pool_port = _free(8500)
        pool = Container(
            pool_image,
            "autoglm-test-pool",
            [
                *("pool", "serve", "--model", "/models/current", "--name", "demo-glm", "--host", "127.0.0.1"),
                *("--port", str(pool_port), "--device", "cpu", "--max-batch", "4"),
            ],
            {models: "/models"},
        )
        containers.append(pool)

        # -- the control plane: SQLite in a volume, the session's registry, the control key --------
        state = _shared(tmp_path / "cloud-state", owner=True)
        db_url = "sqlite:////var/lib/autoglm/state/cloud.db"
        host_db = make_engine(f"sqlite:///{state / 'cloud.db'}")
        migrate(host_db)
        _, key = ApiKeys(host_db).create(tenant, "images", "admin")
        host_db.dispose()
        _shared(state, owner=True)
        keys = _shared(tmp_path / "control")
        CONTROL_KEY.save(keys / "control-signing.pem")
        _shared(keys)
        cloud_port = _free(8400)
        config = _shared(tmp_path / "cloud-config")
        (config / "cloud.yaml").write_text(
            yaml.safe_dump(
                {
                    "database_url": db_url,
                    "registry_dir": "/var/lib/autoglm/registry",
                    "tenants": [tenant],
                    "broker": broker_settings.model_dump(mode="json"),
                    "api": {"host": "127.0.0.1", "port": cloud_port},
                    "rollouts": {"tick_s": 0.5},
                    "control": {"key_file": "/etc/autoglm/control/control-signing.pem"},
                    "gateway": {"upstreams": [{"url": f"http://127.0.0.1:{pool_port}/v1", "name": "pool"}]},
                }
            )
        )
        _shared(config)
        cloud = Container(
            cloud_image,
            "autoglm-test-cloud",
            ["cloud", "serve", "--config", "/etc/autoglm/cloud.yaml"],
            {
                config / "cloud.yaml": "/etc/autoglm/cloud.yaml",
                state: "/var/lib/autoglm/state",
                _shared(registry.root): f"/var/lib/autoglm/registry/{tenant}",
                keys: "/etc/autoglm/control",
            },
        )
        containers.append(cloud)

        # -- the edge: a device of the tenant, trusting the session's keys ----------------------
        edge_port = _free(8080)
        edge_data = _shared(tmp_path / "edge-data", owner=True)
        edge_config = _shared(tmp_path / "edge-config")
        (edge_config / "edge.yaml").write_text(
            yaml.safe_dump(
                {
                    "device_id": "container-edge",
                    "tenant": tenant,
                    "data_dir": "/var/lib/autoglm",
                    "broker": broker_settings.model_dump(mode="json"),
                    "trusted_keys": [signing_key.public.b64],
                    "control": {"trusted_keys": [CONTROL_KEY.public.b64]},
                    "api": {"host": "127.0.0.1", "port": edge_port},
                    "runtime": {"threads": 1},
                }
            )
        )
        _shared(edge_config)
        edge = Container(
            edge_image,
            "autoglm-test-edge",
            ["edge", "run", "--config", "/etc/autoglm/edge.yaml"],
            {edge_config / "edge.yaml": "/etc/autoglm/edge.yaml", edge_data: "/var/lib/autoglm"},
        )
        containers.append(edge)
        # Docker runs each image's own HEALTHCHECK (on the image's port) and reports healthy.
        for c in (cloud, edge, pool):
            c.wait_healthy()
            assert c.user() == str(UID), f"{c.name} runs as {c.user()}"
            assert c.inspect()["Config"]["User"] == str(UID)

        api = f"http://127.0.0.1:{cloud_port}"
        auth = {"authorization": f"Bearer {key}"}

        def devices() -> dict[str, Any]:
            return {
                d["device_id"]: d
                for d in httpx.get(f"{api}/v1/devices", headers=auth, timeout=10).json()["devices"]
            }

        eventually(lambda: "container-edge" in devices(), 60, "the edge container to report")
        r = httpx.post(
            f"{api}/v1/rollouts",
            headers=auth,
            json={"model": "demo-glm:1", "waves": [100], "health_window_s": 1.0},
            timeout=30,
        )
        assert r.status_code == 201, r.text
        rid = r.json()["rollout_id"]
        eventually(
            lambda: (
                httpx.get(f"{api}/v1/rollouts/{rid}", headers=auth, timeout=10).json()["state"] == "completed"
            ),
            240,
            f"the rollout to complete\n{edge.logs()}",
        )
        assert devices()["container-edge"]["active_model"] == "demo-glm:1"
        chat = httpx.post(
            f"http://127.0.0.1:{edge_port}/v1/chat/completions",
            json={"model": "default", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8},
            timeout=60,
        )
        assert chat.status_code == 200, chat.text
        assert chat.json()["choices"][0]["message"]["role"] == "assistant"
        # The pool answers directly and through the control plane's gateway.
        body = {"model": "demo-glm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        assert (
            httpx.post(
                f"http://127.0.0.1:{pool_port}/v1/chat/completions", json=body, timeout=120
            ).status_code
            == 200
        )
        via = httpx.post(f"{api}/v1/chat/completions", json=body, headers=auth, timeout=120)
        assert via.status_code == 200, via.text

    finally:
        for c in containers:
            c.remove()
