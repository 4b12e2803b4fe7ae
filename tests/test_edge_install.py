"""``pip install .`` in a fresh venv gives a working ``autoglm --help``; ``.[edge]`` on top pulls
no torch, and the edge agent runs from it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from cloud.registry import ModelRegistry, RegistryEntry
from shared.messages import DesiredState, Phase
from shared.mqtt import BrokerSettings
from shared.signing import SigningKey
from tests.conftest import DEVICE, REPO, CloudSide, start_edge


@pytest.mark.slow
@pytest.mark.long
def test_edge_extra_installs_without_torch_and_serves(
    tmp_path: Path,
    broker_settings: BrokerSettings,
    tenant: str,
    demo_package: RegistryEntry,
    registry: ModelRegistry,
    signing_key: SigningKey,
) -> None:
    venv = tmp_path / "edge-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    base = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert base.returncode == 0, base.stderr[-3000:]
    for args in (["--help"], ["edge", "--help"], ["cloud", "--help"], ["model", "--help"]):
        shown = subprocess.run(
            [str(venv / "bin" / "autoglm"), *args], capture_output=True, text=True, timeout=120
        )
        assert shown.returncode == 0 and "Usage" in shown.stdout, (args, shown.stderr[-2000:])
    pip = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", f"{REPO}[edge]"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert pip.returncode == 0, pip.stderr[-3000:]
    listed = subprocess.run(
        [str(venv / "bin" / "pip"), "list", "--format=freeze"], capture_output=True, text=True
    )
    names = {line.split("==")[0].lower() for line in listed.stdout.splitlines()}
    assert "onnxruntime" in names and "tokenizers" in names
    assert not names & {"torch", "transformers", "optimum", "accelerate"}, names
    probe = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch"], capture_output=True)
    assert probe.returncode != 0

    edge = start_edge(
        tmp_path,
        device_id=DEVICE,
        tenant=tenant,
        broker=broker_settings,
        trusted=[signing_key.public.b64],
        command=[str(venv / "bin" / "autoglm")],
    )
    try:
        CloudSide(broker_settings, tenant, registry).drive(
            DesiredState(revision=1, model=demo_package.ref), lambda r: r.phase == Phase.ACTIVE
        )
        edge.wait_ready()
        r = httpx.post(
            f"{edge.api}/v1/completions",
            json={"model": "demo-glm", "prompt": "import ", "max_tokens": 8, "temperature": 0},
            timeout=60,
        )
        assert r.status_code == 200 and r.json()["choices"][0]["text"]
        assert r.headers["x-autoglm-served-by"] == "local"
    finally:
        edge.stop()
