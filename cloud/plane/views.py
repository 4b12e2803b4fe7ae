"""What the control plane's REST API answers, as pydantic models: FastAPI validates every answer
against them and the OpenAPI document (``/openapi.json``, ``/docs``) shows them.

Times are ISO 8601 strings in UTC. ``extra="forbid"`` keeps a view and the code that fills it
from drifting apart (an unexpected key is a 500 in tests, not a silent extra field).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from shared.openai_api import ModelCard


class View(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Health(View):
    status: Literal["ok"]


class Readiness(View):
    ready: bool
    replica: str | None = None
    reason: str | None = None
    # Tenants whose MQTT session is down. Not a reason to leave the Service: the REST API, the
    # console and the fallback gateway work without the broker (which restarts after every
    # enrolment), and every replica would leave it at once.
    broker_offline: list[str] = []


# -- devices ---------------------------------------------------------------------------------------
class DeviceView(View):
    device_id: str
    labels: dict[str, str]
    status: str
    last_seen: str | None
    phase: str | None
    active_model: str | None
    reported_revision: int
    desired_revision: int
    desired_model: dict[str, Any] | None
    desired_config: dict[str, Any]
    last_error: dict[str, Any] | None
    config_error: dict[str, Any] | None
    control_error: dict[str, Any] | None
    capabilities: dict[str, Any] | None
    evaluation: dict[str, Any] | None = None


class DeviceList(View):
    devices: list[DeviceView]
    # With ?limit: the id the next page starts after (null on the last page).
    next_after: str | None = None


# -- models ----------------------------------------------------------------------------------------
def model_view(entry: Any, pool_digest: str | None = None) -> dict[str, Any]:
    """A registry entry as ``ModelView`` fields (the REST API and the console show the same)."""
    m = entry.manifest
    return {
        "pool_digest": pool_digest,
        "name": entry.name,
        "version": entry.version,
        "manifest_digest": entry.digest,
        "architecture": m.architecture,
        "parameters": m.parameters,
        "quantization": m.quantization.model_dump(),
        "size_bytes": sum(f.blob.size for f in m.files),
        "quality": m.quality.model_dump() if m.quality else None,
        "kv_cache": m.io.kv_cache,
    }


class ModelView(View):
    name: str
    version: str
    manifest_digest: str
    architecture: str
    parameters: int
    quantization: dict[str, Any]
    size_bytes: int
    quality: dict[str, Any] | None
    kv_cache: str
    # The full-precision source the cloud pool serves for this version (None: packaged without).
    pool_digest: str | None = None


class ModelDetail(ModelView):
    manifest: dict[str, Any]


class Catalogue(View):
    """``data``: the OpenAI model list of what the gateway serves; ``models`` (operator keys
    only): the tenant's registry."""

    object: Literal["list"] = "list"
    data: list[ModelCard]
    models: list[ModelView] | None = None


class ModelDeleted(View):
    deleted: str
    bytes_freed: int


# -- rollouts --------------------------------------------------------------------------------------
class WaveView(View):
    index: int
    percent: int | float
    devices: int
    states: dict[str, int]


class RolloutDeviceView(View):
    device_id: str
    wave: int
    state: str
    detail: str | None


class RolloutView(View):
    rollout_id: str
    model: dict[str, Any]
    selector: str
    state: str
    current_wave: int
    message: str | None
    failure_threshold: float
    health_window_s: float
    wave_timeout_s: float
    max_concurrent: int
    allow_downgrade: bool
    min_samples: int
    max_eval_drop: float
    created_at: str
    updated_at: str
    driver: str | None
    waves: list[WaveView]
    devices: list[RolloutDeviceView]


class RolloutList(View):
    rollouts: list[RolloutView]


# -- keys ------------------------------------------------------------------------------------------
class KeyView(View):
    key_id: str
    name: str
    scope: str
    created_at: str | None
    expires_at: str | None
    revoked: bool
    expired: bool


class KeyList(View):
    keys: list[KeyView]


class KeyCreated(KeyView):
    key: str  # the secret, in this answer only


class KeyRevoked(View):
    key_id: str
    revoked: Literal[True]


# -- commands, config, gateway ---------------------------------------------------------------------
class CommandSent(View):
    request_id: str
    action: str
    counter: int
    status: Literal["sent", "answered"]
    ok: bool | None = None
    detail: str | None = None


class ConfigPushed(View):
    devices: list[str]
    config: dict[str, Any]


class ReplicaView(View):
    name: str
    url: str
    up: bool
    outstanding: int
    served: int
    failures: int
    last_error: str | None
    models: list[str] | None
    # What its /metrics showed it to be (vLLM or our pool; None: neither, or not scraped yet) and
    # its gauges at the last scrape (cloud/gateway/load.py).
    server: Literal["vllm", "autoglm"] | None
    waiting: int | None
    running: int | None
    # What the gateway routes by: its own requests in flight plus the others the scrape saw.
    load: int


class GatewayState(View):
    replicas: list[ReplicaView]
    retries: int
    timeouts: int
    # Answers of a replica's own 5xx or non-JSON 200, replaced by a 502 (the text is logged).
    upstream_errors: int = 0
    stream_breaks: int
    # Requests for a version no replica had, answered by the nearest one (edge fallbacks).
    version_substitutions: int = 0
    rate_limited: int
