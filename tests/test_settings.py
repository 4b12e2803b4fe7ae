"""Edge settings are validated at start-up; environment overrides apply on top of the YAML."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from edge_agent.serving.config import ServingConfig
from edge_agent.settings import BatchSettings, EdgeSettings
from shared.errors import ConfigError
from shared.signing import SigningKey

KEY = SigningKey.generate().public.b64
CONTROL = {"trusted_keys": [SigningKey.generate().public.b64]}


def _write(tmp_path: Path, data: object) -> Path:
    p = tmp_path / "edge.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_example_config_in_the_repo_is_valid() -> None:
    example = Path(__file__).resolve().parents[1] / "edge_agent" / "edge.example.yaml"
    settings = EdgeSettings.load(example, env={})
    # The example documents the defaults: with every serving key spelled out, nothing changes.
    assert ServingConfig.resolve(settings.local_config()) == ServingConfig()
    assert settings.batch == BatchSettings()
    assert settings.api.host == "127.0.0.1"


def test_environment_overrides(tmp_path: Path) -> None:
    p = _write(
        tmp_path, {"device_id": "d1", "data_dir": str(tmp_path), "trusted_keys": [KEY], "control": CONTROL}
    )
    s = EdgeSettings.load(
        p, env={"AUTOGLM_EDGE__BROKER__PORT": "1999", "AUTOGLM_EDGE__API__API_KEY": "s3cret"}
    )
    assert s.broker.port == 1999
    assert s.api.api_key == "s3cret"


@pytest.mark.parametrize("node", ["1234", "0755", "1e3", "true", "2026-12-07", "yes", "1_000"])
def test_an_override_of_a_text_setting_is_taken_as_written(tmp_path: Path, node: str) -> None:
    """Kubernetes fills AUTOGLM_EDGE__DEVICE_ID from the node's name, unquoted: YAML would read
    these as a number, a boolean or a date (0755 as 493)."""
    p = _write(tmp_path, {"data_dir": str(tmp_path), "trusted_keys": [KEY], "control": CONTROL})
    s = EdgeSettings.load(
        p,
        env={
            "AUTOGLM_EDGE__DEVICE_ID": node,
            "AUTOGLM_EDGE__API__API_KEY": "42",
            "AUTOGLM_EDGE__BROKER__PORT": "1999",
        },
    )
    assert (s.device_id, s.api.api_key, s.broker.port) == (node, "42", 1999)
    # A number where a number belongs is still a number, and a wrong one still refused.
    with pytest.raises(ConfigError, match=r"broker\.port"):
        EdgeSettings.load(p, env={"AUTOGLM_EDGE__DEVICE_ID": node, "AUTOGLM_EDGE__BROKER__PORT": "x"})


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("#s3cr3t", "#s3cr3t"),
        ("abc #def", "abc #def"),
        ("'quoted'", "quoted"),
        ("'#x'", "#x"),
        (" k3y\n", "k3y"),
        ("null", None),
        ("~", None),
        ("", None),
    ],
)
def test_a_secret_from_the_environment_is_taken_as_written(tmp_path: Path, text: str, value: object) -> None:
    """Read as YAML, ``#s3cr3t`` was a comment: the API key None, the local API open to anyone."""
    p = _write(
        tmp_path, {"device_id": "d1", "data_dir": str(tmp_path), "trusted_keys": [KEY], "control": CONTROL}
    )
    assert EdgeSettings.load(p, env={"AUTOGLM_EDGE__API__API_KEY": text}).api.api_key == value


@pytest.mark.parametrize("text", ["[1", "{", "[a: b: c]", "'unclosed"])
def test_an_override_that_is_not_yaml_names_its_variable(tmp_path: Path, text: str) -> None:
    p = _write(
        tmp_path, {"device_id": "d1", "data_dir": str(tmp_path), "trusted_keys": [KEY], "control": CONTROL}
    )
    with pytest.raises(ConfigError, match="AUTOGLM_EDGE__FALLBACK__ALLOWED_URLS"):
        EdgeSettings.load(p, env={"AUTOGLM_EDGE__FALLBACK__ALLOWED_URLS": text})


def test_a_config_file_that_is_not_text_or_not_a_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe x")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        EdgeSettings.load(tmp_path / "bin.yaml", env={})
    with pytest.raises(ConfigError, match="cannot be read"):
        EdgeSettings.load(tmp_path, env={})


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ({"data_dir": "/x", "trusted_keys": [KEY]}, "device_id"),
        ({"device_id": "d/1", "data_dir": "/x", "trusted_keys": [KEY]}, "device_id"),
        ({"device_id": "d", "data_dir": "/x", "trusted_keys": []}, "trusted_keys"),
        (
            {"device_id": "d", "data_dir": "/x", "trusted_keys": ["bm90IGEga2V5"]},
            "trusted_keys: .*32 raw Ed25519",
        ),
        (
            {"device_id": "d", "data_dir": "/x", "trusted_keys": [KEY], "control": {"trusted_keys": ["!"]}},
            "control.trusted_keys: .*not valid base64",
        ),
        ({"device_id": "d", "data_dir": "/x", "trusted_keys": [KEY], "api": {"port": 99999}}, "api.port"),
        ({"device_id": "d", "data_dir": "/x", "trusted_keys": [KEY], "typo": 1}, "typo"),
        # Without a pinned control key a device would obey nobody (or, worse, anybody).
        ({"device_id": "d", "data_dir": "/x", "trusted_keys": [KEY]}, "control"),
        (
            {"device_id": "d", "data_dir": "/x", "trusted_keys": [KEY], "control": {"trusted_keys": []}},
            "control.trusted_keys",
        ),
        (
            {
                "device_id": "d",
                "data_dir": "/x",
                "trusted_keys": [KEY],
                "control": CONTROL,
                "fallback": {"allowed_urls": ["ftp://x"]},
            },
            "fallback.allowed_urls",
        ),
    ],
)
def test_invalid_settings_name_the_problem(tmp_path: Path, data: dict, reason: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ConfigError, match=reason):
        EdgeSettings.load(_write(tmp_path, data), env={})


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({"AUTOGLM_KERNELS_AMX": "off"}, r"AUTOGLM_KERNELS_AMX='off': must be 0 or 1"),
        ({"AUTOGLM_KERNELS_PREFETCH": "yes"}, r"AUTOGLM_KERNELS_PREFETCH='yes'"),
        ({"AUTOGLM_KERNELS_ISA": "avx512"}, r"AUTOGLM_KERNELS_ISA='avx512': must be avx2"),
        ({"AUTOGLM_KERNELS_PREFETCHES": "1"}, r"AUTOGLM_KERNELS_PREFETCHES: unknown variable"),
    ],
)
def test_kernel_variables_the_library_would_ignore_stop_the_agent(
    tmp_path: Path, env: dict[str, str], reason: str
) -> None:
    """The C library reads these when each op is made and takes any other value as unset, so a
    typo would leave the default running without a word; start-up names it instead."""
    data = {"device_id": "d1", "data_dir": str(tmp_path), "trusted_keys": [KEY], "control": CONTROL}
    with pytest.raises(ConfigError, match=reason):
        EdgeSettings.load(_write(tmp_path, data), env=env)
    # Values the library acts on load; with the library off (kernels: onnxruntime) nothing reads them.
    good = {"AUTOGLM_KERNELS_AMX": "0", "AUTOGLM_KERNELS_PREFETCH": "1", "AUTOGLM_KERNELS_ISA": "avx2"}
    assert EdgeSettings.load(_write(tmp_path, data), env=good).runtime.kernels == "auto"
    data["runtime"] = {"kernels": "onnxruntime"}
    assert EdgeSettings.load(_write(tmp_path, data), env=env).runtime.kernels == "onnxruntime"


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        EdgeSettings.load(tmp_path / "missing.yaml", env={})
    (tmp_path / "bad.yaml").write_text("a: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        EdgeSettings.load(tmp_path / "bad.yaml", env={})


def test_cloud_example_config_is_valid_and_env_overrides_apply() -> None:
    from cloud.settings import CloudSettings

    example = Path(__file__).resolve().parents[1] / "cloud" / "cloud.example.yaml"
    settings = CloudSettings.load(example, env={"AUTOGLM_CLOUD__API__PORT": "9000"})
    assert settings.database_url.startswith("sqlite:///")
    assert settings.api.port == 9000 and settings.tenants == ["default"]
    numbered = CloudSettings.load(example, env={"AUTOGLM_CLOUD__REPLICA_ID": "0"})
    assert numbered.replica_id == "0"
    # A list's item by its number: a Secret gives one upstream its key.
    pooled = {"AUTOGLM_CLOUD__GATEWAY__UPSTREAMS": "[{url: 'http://pool:8500/v1', discover: true}]"}
    keyed = CloudSettings.load(
        example, env={"AUTOGLM_CLOUD__GATEWAY__UPSTREAMS__0__API_KEY": "1234", **pooled}
    )
    assert keyed.gateway.upstreams[0].api_key == "1234" and keyed.gateway.upstreams[0].discover
    for item in ("7", "first"):
        with pytest.raises(ConfigError, match=f"names item '{item}' of a list of 1"):
            CloudSettings.load(
                example, env={**pooled, f"AUTOGLM_CLOUD__GATEWAY__UPSTREAMS__{item}__API_KEY": "k"}
            )


def test_gateway_upstream_names_must_be_unique(tmp_path: Path) -> None:
    from cloud.settings import CloudSettings

    base = {"database_url": "sqlite://", "registry_dir": str(tmp_path)}
    up = {"url": "http://127.0.0.1:8500/v1"}
    ok = CloudSettings.model_validate({**base, "gateway": {"upstreams": [up, up]}})
    assert ok.gateway.replica_names() == ["pool-0", "pool-1"]
    with pytest.raises(ValueError, match="unique: a"):
        CloudSettings.model_validate(
            {**base, "gateway": {"upstreams": [{**up, "name": "a"}, {**up, "name": "a"}]}}
        )


def test_tls_files_that_are_no_certificate_are_refused_at_start(tmp_path: Path) -> None:
    """Found only at connect, the MQTT loop died while the API went on serving."""
    bad = tmp_path / "bad.crt"
    bad.write_text("garbage")
    p = _write(
        tmp_path, {"device_id": "d1", "data_dir": str(tmp_path), "trusted_keys": [KEY], "control": CONTROL}
    )
    with pytest.raises(ConfigError, match="the TLS files cannot be used"):
        EdgeSettings.load(p, env={"AUTOGLM_EDGE__BROKER__TLS": f"{{ca_file: {bad}}}"})
