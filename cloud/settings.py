"""Control-plane settings: one YAML file plus ``AUTOGLM_CLOUD__SECTION__KEY`` environment overrides."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edge_agent.serving.body_limit import DEFAULT_MAX_BODY_BYTES
from shared.config_env import read_settings_file, validate_settings, validation_problems
from shared.control import DEFAULT_COMMAND_TTL_S, DEFAULT_DESIRED_TTL_S
from shared.errors import ConfigError
from shared.ids import is_valid_name
from shared.mqtt import BrokerSettings

ENV_PREFIX = "AUTOGLM_CLOUD__"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CloudApiSettings(_Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8400
    # Larger request bodies (gateway requests included) are refused with 413 before they are read.
    max_body_bytes: Annotated[int, Field(ge=1024, le=256 * 1024 * 1024)] = DEFAULT_MAX_BODY_BYTES


class RolloutSettings(_Section):
    # How often the driver looks at running rollouts, and how long its lease on one lasts.
    tick_s: Annotated[float, Field(gt=0, le=60)] = 1.0
    lease_s: Annotated[float, Field(gt=0, le=600)] = 15.0


class UpstreamSettings(_Section):
    # Base URL of an OpenAI-compatible API: an `autoglm pool serve` replica or e.g. a vLLM server.
    url: Annotated[str, Field(pattern=r"^https?://", max_length=2048)]
    name: str | None = None
    api_key: str | None = None
    # Every address the URL's host resolves to is a replica of its own (a Kubernetes headless
    # Service: one per pod), looked up again at every health poll. Without it a Service's one
    # address hides its pods: no retry on another, one pod's failure marks all down. http only:
    # a certificate names the host, not each pod's address.
    discover: bool = False

    @model_validator(mode="after")
    def _discover_plain_http(self) -> UpstreamSettings:
        try:
            _ = urlsplit(self.url).port  # raises for a port out of range or not a number
        except ValueError as exc:
            raise ValueError(f"url {self.url!r}: {exc}") from exc
        if self.discover and not self.url.startswith("http://"):
            raise ValueError("discover needs an http:// URL (a certificate names the host, not each address)")
        return self


class RateLimitSettings(_Section):
    # Per tenant and per control-plane replica (buckets are in memory).
    requests_per_s: Annotated[float, Field(gt=0, le=1_000_000)] = 20.0
    burst: Annotated[int, Field(ge=1, le=1_000_000)] = 40


class GatewaySettings(_Section):
    upstreams: list[UpstreamSettings] = []
    # Every replica's /models (and its server's readiness) is polled this often.
    health_interval_s: Annotated[float, Field(gt=0, le=300)] = 2.0
    # Every replica's /metrics is scraped this often for its queue. Between scrapes only the
    # gateway's own requests are counted live; below 0.1 s the scrapes would cost the replicas
    # (vLLM's page is mostly histograms) more than the freshness is worth.
    load_interval_s: Annotated[float, Field(ge=0.1, le=60)] = 1.0
    connect_timeout_s: Annotated[float, Field(gt=0, le=60)] = 2.0
    # The longest a generation may take on a replica.
    request_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 300.0
    max_attempts: Annotated[int, Field(ge=1, le=10)] = 3
    rate_limit: RateLimitSettings = Field(default_factory=RateLimitSettings)

    def replica_names(self) -> list[str]:
        return [u.name or f"pool-{i}" for i, u in enumerate(self.upstreams)]

    @model_validator(mode="after")
    def _unique_names(self) -> GatewaySettings:
        names = self.replica_names()
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"upstream names must be unique: {', '.join(dupes)}")
        return self


class ConsoleSettings(_Section):
    # The operator console at /ui (cloud/console): sign-in with an operator or admin key.
    enabled: bool = True
    # How long a sign-in lasts (the key's own expiry or revocation ends it sooner).
    session_ttl_s: Annotated[float, Field(ge=60, le=30 * 86400)] = 8 * 3600
    # Send the session cookie only over HTTPS: set it when the console is served behind TLS.
    secure_cookie: bool = False
    # How often an open page refreshes its live parts.
    refresh_s: Annotated[float, Field(ge=0.5, le=300)] = 2.0


class HistorySettings(_Section):
    # Telemetry records and device events older than this are deleted (both grow with every
    # request and every status change: a fleet's telemetry is millions of rows a day). At least
    # a day: rollout health windows and the console's charts read the recent hours.
    retention_days: Annotated[float, Field(ge=1, le=3650)] = 30.0
    # How often each replica deletes what has aged out.
    prune_every_s: Annotated[float, Field(ge=10, le=86400)] = 3600.0


class ControlSettings(_Section):
    """The control key: devices obey only desired states and commands it signed."""

    # PEM Ed25519 private key; None: $AUTOGLM_HOME/keys/control-signing.pem, created on first
    # start. Every replica must use the same key (a Kubernetes Secret in manifests/).
    key_file: Path | None = None
    # A retained desired state stays valid this long for a device that is offline (one that
    # expired is signed afresh when the device reports the refusal).
    desired_ttl_s: Annotated[float, Field(ge=10, le=365 * 86400)] = DEFAULT_DESIRED_TTL_S
    # A command delivered later than this is refused by the device.
    command_ttl_s: Annotated[float, Field(ge=1, le=86400)] = DEFAULT_COMMAND_TTL_S


class CloudSettings(_Section):
    # SQLAlchemy URL: sqlite:////var/lib/autoglm/cloud.db or postgresql+psycopg://user@host/db
    database_url: str
    # Tenant T's registry is registry_dir/T (what `autoglm model package --registry` writes).
    registry_dir: Path
    tenants: Annotated[list[str], Field(min_length=1)] = ["default"]
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    api: CloudApiSettings = Field(default_factory=CloudApiSettings)
    rollouts: RolloutSettings = Field(default_factory=RolloutSettings)
    # The fallback gateway (/v1/chat/completions, /v1/completions) in front of the pool replicas.
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    control: ControlSettings = Field(default_factory=ControlSettings)
    console: ConsoleSettings = Field(default_factory=ConsoleSettings)
    history: HistorySettings = Field(default_factory=HistorySettings)
    # Unique and stable per replica (a StatefulSet pod name): it names the replica's MQTT session
    # and its rollout leases. The default is the host name; set it when two run on one host.
    replica_id: str = Field(default_factory=socket.gethostname)

    @field_validator("tenants")
    @classmethod
    def _names(cls, tenants: list[str]) -> list[str]:
        for t in tenants:
            if not is_valid_name(t):
                raise ValueError(f"invalid tenant name {t!r}")
        return tenants

    @classmethod
    def load(cls, path: Path, env: Mapping[str, str] | None = None) -> CloudSettings:
        raw, texts = read_settings_file(path, ENV_PREFIX, env)
        try:
            return validate_settings(cls, raw, texts)
        except ValidationError as exc:
            raise ConfigError(
                f"invalid cloud settings: {validation_problems(exc)}", source=str(path)
            ) from exc
