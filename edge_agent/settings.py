"""Edge agent settings: one YAML file plus ``AUTOGLM_EDGE__SECTION__KEY`` environment overrides.

Validated once at start-up; an invalid file stops the agent with a ConfigError that names the key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from edge_agent.runtime.kernels import environment_problems, library
from edge_agent.serving.body_limit import DEFAULT_MAX_BODY_BYTES
from shared.batch_api import MAX_BATCH_LINES
from shared.config_env import EnvTexts, read_settings_file, validate_settings, validation_problems
from shared.control import DEFAULT_MAX_CLOCK_SKEW_S
from shared.edge_config import EdgeConfig, RouterConfig, RuntimeTuning, SamplingDefaults, TelemetryConfig
from shared.errors import ConfigError
from shared.ids import Name
from shared.mqtt import BrokerSettings
from shared.signing import PublicKey

ENV_PREFIX = "AUTOGLM_EDGE__"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_keys(keys: list[str]) -> list[str]:
    for k in keys:
        try:
            PublicKey.from_b64(k)
        except ConfigError as exc:
            # A ValueError, so that the message names the setting (trusted_keys or
            # control.trusted_keys) and the item.
            raise ValueError(str(exc)) from exc
    return keys


# Base64 raw Ed25519 public keys, at least one, each checked at start-up.
TrustedKeys = Annotated[list[str], Field(min_length=1), AfterValidator(_check_keys)]


class ApiSettings(_Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    # When set, every /v1 request must carry ``Authorization: Bearer <api_key>``.
    api_key: str | None = None
    # Larger request bodies are refused with 413 before they are read.
    max_body_bytes: Annotated[int, Field(ge=1024, le=256 * 1024 * 1024)] = DEFAULT_MAX_BODY_BYTES


class RuntimeSettings(RuntimeTuning):
    """threads / queue_size / parallel / default_max_tokens, which the cloud may also push, plus the providers."""

    # None: CUDA when this onnxruntime build and device have it, then CPU.
    providers: list[str] | None = None
    # CPU kernels for the quantized matmuls and attention: "auto" registers the edge's own (built at install,
    # used on x86-64 CPUs with AVX-512 VNNI or AVX2; elsewhere, or if a graph is refused,
    # onnxruntime's run);
    # "onnxruntime" always runs onnxruntime's own.
    kernels: Literal["auto", "onnxruntime"] = "auto"

    def kernel_library(self) -> Path | None:
        """The custom-op library to register when a model loads, or None."""
        return library() if self.kernels == "auto" else None


class FetchSettings(_Section):
    # A window of chunks per request; the next window is asked for once half of one has landed,
    # so at most 1.5 windows (48 MiB with 1 MiB chunks) wait at the broker for this device.
    chunks_per_request: Annotated[int, Field(ge=1, le=4096)] = 32
    # With no chunk arriving for this long, the missing ones are asked for again.
    request_timeout_s: Annotated[float, Field(gt=0, le=600)] = 10.0
    max_attempts_without_progress: Annotated[int, Field(ge=1, le=1000)] = 10
    # A chunk that arrives damaged this many times fails the update (integrity_error).
    max_chunk_rejections: Annotated[int, Field(ge=1, le=1000)] = 5
    # Transfer rate cap in bytes per second (None: as fast as the broker sends).
    max_bytes_per_s: Annotated[int, Field(gt=0)] | None = None


class FallbackSettings(_Section):
    """Device-local half of the cloud fallback (where and under which policy is pushed: ``router``)."""

    # The tenant's inference key for the cloud gateway (never pushed over MQTT). It is sent only
    # to the URLs below or to this file's own router.cloud_url.
    api_key: str | None = None
    # The cloud URLs a pushed router.cloud_url may name (this file's router.cloud_url is always
    # allowed); a push naming another is refused, so nobody can redirect prompts and the key.
    allowed_urls: list[Annotated[str, Field(max_length=2048, pattern=r"^https?://")]] = []
    # An unreachable cloud is given up on after this long, however long a generation may take.
    connect_timeout_s: Annotated[float, Field(gt=0, le=60)] = 2.0
    # Consecutive cloud failures that open the circuit, and how long it stays open before a probe.
    breaker_failures: Annotated[int, Field(ge=1, le=100)] = 3
    breaker_reset_s: Annotated[float, Field(gt=0, le=3600)] = 15.0


class ControlSettings(_Section):
    """Who may tell this device what to do (signed desired states and commands)."""

    # Base64 raw Ed25519 public keys of the control plane's control key (`autoglm cloud control-key`).
    trusted_keys: TrustedKeys
    # Expiry of a control message is judged with this much slack for this device's clock.
    max_clock_skew_s: Annotated[float, Field(ge=0, le=86400)] = DEFAULT_MAX_CLOCK_SKEW_S

    def public_keys(self) -> list[PublicKey]:
        return [PublicKey.from_b64(k) for k in self.trusted_keys]


class OutboxSettings(_Section):
    # Undelivered telemetry beyond this many records drops the oldest first (reported state is kept).
    max_records: Annotated[int, Field(ge=100, le=10_000_000)] = 1_000_000
    # An entry the control plane has not acknowledged as stored this long after the broker took
    # it is sent again (the cloud de-duplicates).
    ack_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    # Entries sent and awaiting acknowledgement at once.
    max_in_flight: Annotated[int, Field(ge=1, le=100_000)] = 2000


class BatchSettings(_Section):
    """The Batch API's journal (``data_dir/batches.sqlite3``) and its background worker."""

    # Uploaded files, batch results and finished batches are deleted this long after they were
    # created (files) or finished (batches), unless deleted before.
    retention_s: Annotated[float, Field(gt=0, le=365 * 86400)] = 30 * 86400.0
    # Larger uploads are refused with 413 (the request-body cap api.max_body_bytes does not apply).
    max_file_bytes: Annotated[int, Field(ge=1024, le=1024 * 1024 * 1024)] = 64 * 1024 * 1024
    # Requests in one batch file (OpenAI's limit is 50,000).
    max_lines: Annotated[int, Field(ge=1, le=MAX_BATCH_LINES)] = MAX_BATCH_LINES
    # A batch request runs locally only once no interactive request has waited or run for this long.
    idle_s: Annotated[float, Field(ge=0, le=3600)] = 1.0
    # While the cloud cannot be reached, requests for it are retried after delays doubling from
    # the first to the second (with jitter), and at once when the MQTT link comes back.
    cloud_retry_initial_s: Annotated[float, Field(gt=0, le=3600)] = 1.0
    cloud_retry_max_s: Annotated[float, Field(gt=0, le=86400)] = 60.0
    # Batch requests sent to the cloud at once while it answers.
    cloud_concurrency: Annotated[int, Field(ge=1, le=64)] = 4
    # How often expired batches and files are looked for.
    sweep_interval_s: Annotated[float, Field(gt=0, le=86400)] = 60.0

    @model_validator(mode="after")
    def _retry_bounds(self) -> BatchSettings:
        if self.cloud_retry_max_s < self.cloud_retry_initial_s:
            raise ValueError("cloud_retry_max_s must not be below cloud_retry_initial_s")
        return self


class EdgeSettings(_Section):
    device_id: Name
    tenant: Name = "default"
    data_dir: Path
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    # Manifests signed by any other key are refused.
    trusted_keys: TrustedKeys
    control: ControlSettings
    api: ApiSettings = Field(default_factory=ApiSettings)
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings)
    fetch: FetchSettings = Field(default_factory=FetchSettings)
    outbox: OutboxSettings = Field(default_factory=OutboxSettings)
    fallback: FallbackSettings = Field(default_factory=FallbackSettings)
    batch: BatchSettings = Field(default_factory=BatchSettings)
    # The sections below have the schema the cloud pushes (shared/edge_config.py); a push overrides
    # them key by key, and keys neither here nor pushed take the defaults in serving/config.py.
    sampling: SamplingDefaults = Field(default_factory=SamplingDefaults)
    router: RouterConfig = Field(default_factory=RouterConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)

    def local_config(self) -> EdgeConfig:
        """This file's serving keys as a config document, the base that pushes overlay."""
        runtime = RuntimeTuning(**self.runtime.model_dump(exclude={"providers", "kernels"}))
        return EdgeConfig(
            runtime=runtime, sampling=self.sampling, router=self.router, telemetry=self.telemetry
        )

    def public_keys(self) -> list[PublicKey]:
        return [PublicKey.from_b64(k) for k in self.trusted_keys]

    def allowed_cloud_urls(self) -> frozenset[str]:
        """Where the fallback may send prompts and the API key: this file's URL and the allow-list."""
        urls = {_norm_url(u) for u in self.fallback.allowed_urls}
        if self.router.cloud_url:
            urls.add(_norm_url(self.router.cloud_url))
        return frozenset(urls)

    @classmethod
    def load(cls, path: Path, env: Mapping[str, str] | None = None) -> EdgeSettings:
        """The settings in ``path`` with ``env``'s overrides (the process environment when None);
        also refuses ``AUTOGLM_KERNELS_*`` values the kernel library would silently ignore."""
        environ = os.environ if env is None else env
        raw, texts = read_settings_file(path, ENV_PREFIX, environ)
        settings = cls.from_mapping(raw, source=str(path), env_texts=texts)
        if settings.runtime.kernels == "auto" and (problems := environment_problems(environ)):
            raise ConfigError(f"invalid kernel environment: {'; '.join(problems)}", source="environment")
        return settings

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any], source: str = "<settings>", env_texts: EnvTexts | None = None
    ) -> EdgeSettings:
        try:
            return validate_settings(cls, dict(data), env_texts or {})
        except ValidationError as exc:
            raise ConfigError(f"invalid edge settings: {validation_problems(exc)}", source=source) from exc


def _norm_url(url: str) -> str:
    return url.rstrip("/")


def url_allowed(url: str, allowed: frozenset[str]) -> bool:
    return _norm_url(url) in allowed
