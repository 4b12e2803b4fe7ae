"""Deployment files checked against the real things: Kubernetes schemas, the CLI, the settings.

* every YAML document under manifests/ and kubeedge/ validates (strictly: unknown fields fail)
  against the Kubernetes API schemas of a current release;
* every command an image or a container runs, and every ``autoglm`` command docs/deploy.md
  tells an operator to type, is accepted by the real CLI (subcommands and option names);
* every config file embedded in a ConfigMap, with the environment overrides its pods set,
  validates with the settings class of the process that reads it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cloud.settings import ENV_PREFIX as CLOUD_ENV
from cloud.settings import CloudSettings
from edge_agent.settings import ENV_PREFIX as EDGE_ENV
from edge_agent.settings import EdgeSettings
from shared.config_env import apply_env

REPO = Path(__file__).resolve().parents[1]
K8S_VERSION = "1.34.0"
YAML_FILES = sorted([*REPO.glob("manifests/**/*.yaml"), *REPO.glob("kubeedge/**/*.yaml")])
DOCKERFILES = sorted(REPO.glob("manifests/images/*.Dockerfile"))


def _documents() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in YAML_FILES:
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                yield f"{path.relative_to(REPO)}#{i}", doc


DOCUMENTS = list(_documents())


def test_there_is_something_to_check() -> None:
    kinds = {doc["kind"] for _, doc in DOCUMENTS}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "DaemonSet"} <= kinds
    assert {p.name for p in DOCKERFILES} == {
        "cloud.Dockerfile",
        "pool.Dockerfile",
        "edge.Dockerfile",
        "edge-gpu.Dockerfile",
    }


@pytest.mark.parametrize(("where", "doc"), DOCUMENTS, ids=[w for w, _ in DOCUMENTS])
def test_manifest_validates_against_the_kubernetes_schema(where: str, doc: dict[str, Any]) -> None:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{where}: {exc.message} at {'.'.join(map(str, exc.path))}")


# -- commands ------------------------------------------------------------------------------------
def _cli_accepts(args: list[str]) -> None:
    """``autoglm ARGS --help`` exits 0: the subcommands exist and every option name is known."""
    r = subprocess.run(
        [sys.executable, "-m", "cloud.cli", *args, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert r.returncode == 0, f"autoglm {shlex.join(args)}: {r.stderr or r.stdout}"


def _containers() -> Iterator[tuple[str, dict[str, Any]]]:
    for where, doc in DOCUMENTS:
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("initContainers", []) + spec.get("containers", []):
            yield f"{where}/{c['name']}", c


AUTOGLM_CONTAINERS = [(w, c) for w, c in _containers() if c["image"].startswith("autoglm/")]


@pytest.mark.parametrize(("where", "container"), AUTOGLM_CONTAINERS, ids=[w for w, _ in AUTOGLM_CONTAINERS])
def test_container_commands_are_real_cli_commands(where: str, container: dict[str, Any]) -> None:
    assert "command" not in container, "keep the image's autoglm entrypoint"
    _cli_accepts(container["args"])


def _dockerfile_json(text: str, instruction: str) -> list[str]:
    match = re.search(rf"^{instruction}\s+(\[.*\])\s*$", text, re.MULTILINE)
    assert match, f"no exec-form {instruction}"
    value: list[str] = json.loads(match.group(1))
    return value


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_runs_a_real_command_as_a_non_root_user_with_a_health_check(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    assert _dockerfile_json(text, "ENTRYPOINT") == ["autoglm"]
    _cli_accepts(_dockerfile_json(text, "CMD"))
    user = re.findall(r"^USER\s+(\S+)", text, re.MULTILINE)
    assert user and user[-1] not in {"root", "0"}
    assert re.search(r"^HEALTHCHECK .*--interval", text, re.MULTILINE)
    # Pinned base images and packages: a tag with a patch version, the tested constraints.
    for base in re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE):
        assert re.search(r":\d+\.\d+\.\d+", base), base
    assert "-c /opt/autoglm/constraints.txt" in text
    for copied in re.findall(r"^COPY\s+(\S+)", text, re.MULTILINE):
        assert (REPO / copied).exists(), copied


def test_deploy_guide_commands_exist() -> None:
    guide = (REPO / "docs" / "deploy.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", guide, re.DOTALL)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith("autoglm "):
                commands.append(shlex.split(line.split(" #")[0])[1:])
    assert len(commands) >= 8, commands
    for args in commands:
        _command_exists(args)


def _command_exists(args: list[str]) -> None:
    """The subcommands and every option name exist (option values in a guide are placeholders)."""
    import typer

    from cloud.cli import app

    cmd: Any = typer.main.get_command(app)
    words = list(args)
    while hasattr(cmd, "commands") and words != ["--help"]:  # a group (typer vendors its click)
        assert words, f"autoglm {shlex.join(args)}: incomplete"
        sub = cmd.commands.get(words.pop(0))
        assert sub is not None, f"autoglm {shlex.join(args)}: no such command"
        cmd = sub
    known = {"--help", *(opt for param in cmd.params for opt in [*param.opts, *param.secondary_opts])}
    for w in words:
        if w.startswith("-"):
            assert w.split("=")[0] in known, f"autoglm {shlex.join(args)}: no option {w}"


# -- config keys -----------------------------------------------------------------------------------
def _configmap(name: str, key: str) -> dict[str, Any]:
    for _, doc in DOCUMENTS:
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == name:
            data: dict[str, Any] = yaml.safe_load(doc["data"][key])
            return data
    raise AssertionError(f"no ConfigMap {name}")


def _env_names(prefix: str) -> dict[str, str]:
    names = {}
    for _, c in _containers():
        for e in c.get("env", []):
            if e["name"].startswith(prefix):
                names[e["name"]] = "placeholder-value"
    return names


def _real_files(raw: dict[str, Any], tmp: Path) -> None:
    """TLS paths point into a pod; give the validator files that exist."""
    tls = raw.get("broker", {}).get("tls")
    if tls:
        for key in tls:
            f = tmp / key
            f.write_text("pem")
            tls[key] = str(f)


def test_control_plane_config_and_env_are_settings_keys(tmp_path: Path) -> None:
    raw = _configmap("autoglm-control-plane", "cloud.yaml")
    env = _env_names(CLOUD_ENV)
    assert f"{CLOUD_ENV}DATABASE_URL" in env
    apply_env(raw, env, CLOUD_ENV)
    _real_files(raw, tmp_path)
    settings = CloudSettings.model_validate(raw)
    assert settings.gateway.upstreams and settings.broker.tls is not None


def test_edge_config_and_env_are_settings_keys(tmp_path: Path) -> None:
    raw = _configmap("autoglm-edge", "edge.yaml")
    env = _env_names(EDGE_ENV)
    assert {f"{EDGE_ENV}DEVICE_ID", f"{EDGE_ENV}FALLBACK__API_KEY"} <= set(env)
    apply_env(raw, env, EDGE_ENV)
    settings = EdgeSettings.from_mapping(raw)
    assert settings.device_id == "placeholder-value"
    assert str(settings.data_dir) == "/var/lib/autoglm"


def test_broker_configmap_has_the_generated_tls_and_acl_directives() -> None:
    from cloud.mqtt.pki import broker_tls_lines

    for _, doc in DOCUMENTS:
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == "autoglm-mosquitto":
            conf = doc["data"]["mosquitto.conf"].splitlines()
            break
    else:
        raise AssertionError("no broker ConfigMap")
    certs = "/mosquitto/certs"
    expected = broker_tls_lines(
        f"{certs}/ca.crt", f"{certs}/broker.crt", f"{certs}/broker.key", f"{certs}/acl"
    )
    assert set(expected) <= set(conf), set(expected) - set(conf)


def dashboard_metrics(prefix: str) -> set[str]:
    """Metric names (without _total/_bucket/_count) the Grafana dashboard queries, by prefix."""
    dash = json.loads((REPO / "manifests" / "grafana-dashboard.json").read_text())
    names: set[str] = set()
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            for name in re.findall(r"\b(autoglm_[a-z_]+)", target["expr"]):
                if name.startswith(prefix):
                    names.add(re.sub(r"_(total|bucket|count|sum)$", "", name))
    return names


def test_dashboard_is_valid_json_with_panels_for_fleet_and_pool() -> None:
    assert dashboard_metrics("autoglm_edge_") and dashboard_metrics("autoglm_pool_")
    assert dashboard_metrics("autoglm_cloud_")
