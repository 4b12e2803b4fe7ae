"""Serving configuration the cloud pushes to devices in ``DesiredState.config`` (schema v1).

The agent validates a pushed document with :meth:`EdgeConfig.parse` before applying anything;
the control plane validates with the same call before it publishes. Every field is optional:
what a push leaves out keeps the value from the device's own ``edge.yaml``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import Field, ValidationError

from shared.errors import ContractError
from shared.wire import WireModel

EDGE_CONFIG_SCHEMA = "autoglm.edge-config/v1"


class RouterPolicy(StrEnum):
    """Where a request is served (DESIGN.md §5); the cloud side of routing is the fallback issue."""

    LOCAL_FIRST = "local_first"
    LOCAL_ONLY = "local_only"
    CLOUD_FIRST = "cloud_first"
    CLOUD_ONLY = "cloud_only"


class RuntimeTuning(WireModel):
    # onnxruntime intra-op threads; 0 lets onnxruntime choose. A change reloads the active model.
    threads: Annotated[int, Field(strict=True, ge=0, le=256)] | None = None
    # Requests allowed to wait while others generate; beyond it the API answers 429.
    queue_size: Annotated[int, Field(strict=True, ge=0, le=4096)] | None = None
    # Requests decoded together in one batched step (parallel slots); 1: one at a time. Each
    # takes its own KV-cache row (memory grows with it; rows also keep the prefix caches of
    # prompts taking turns); applies to the next request admitted.
    parallel: Annotated[int, Field(strict=True, ge=1, le=64)] | None = None
    # Decode even a lone request as a batch of two, so that no answer depends on what else is
    # decoding (quantized graphs; a lone stream decodes slower). Off: answers are as good, and
    # the same at temperature 0 unless other requests decode beside them.
    batch_invariant: bool | None = None
    default_max_tokens: Annotated[int, Field(strict=True, ge=1, le=32768)] | None = None


class SamplingDefaults(WireModel):
    """Used when a request does not say; requests may always override."""

    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, Field(strict=True, ge=0)] | None = None


class RouterConfig(WireModel):
    policy: RouterPolicy | None = None
    # The cloud gateway's OpenAI-compatible base URL for fallback, e.g. https://cloud/v1.
    cloud_url: Annotated[str, Field(max_length=2048, pattern=r"^https?://")] | None = None
    cloud_timeout_s: Annotated[float, Field(gt=0, le=600)] | None = None


class TelemetryConfig(WireModel):
    # Records per telemetry message when the outbox drains.
    batch_size: Annotated[int, Field(strict=True, ge=1, le=1000)] | None = None
    # How long a record may wait for others to share its message (0: send each at once).
    flush_interval_s: Annotated[float, Field(ge=0, le=60)] | None = None


class EdgeConfig(WireModel):
    runtime: RuntimeTuning = Field(default_factory=RuntimeTuning)
    sampling: SamplingDefaults = Field(default_factory=SamplingDefaults)
    router: RouterConfig = Field(default_factory=RouterConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)

    @classmethod
    def parse(cls, data: dict[str, Any]) -> EdgeConfig:
        """Validate a pushed config; ContractError names every offending key."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors()
            )
            raise ContractError(f"invalid edge config: {problems}", schema=EDGE_CONFIG_SCHEMA) from exc
