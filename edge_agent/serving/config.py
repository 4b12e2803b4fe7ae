"""The effective serving configuration: defaults, overlaid by edge.yaml, overlaid by the cloud's push."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from shared.edge_config import EdgeConfig, RouterPolicy


@dataclass(frozen=True)
class ServingConfig:
    threads: int = 0
    queue_size: int = 16
    parallel: int = 4
    batch_invariant: bool = False
    default_max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    router_policy: RouterPolicy = RouterPolicy.LOCAL_FIRST
    cloud_url: str | None = None
    cloud_timeout_s: float = 30.0
    telemetry_batch_size: int = 200
    telemetry_flush_interval_s: float = 1.0

    @classmethod
    def resolve(cls, *layers: EdgeConfig) -> ServingConfig:
        """Later layers win, key by key; keys no layer sets keep the defaults above."""
        values: dict[str, Any] = {}
        for layer in layers:
            for section in ("runtime", "sampling", "router", "telemetry"):
                part = getattr(layer, section)
                for key, value in part.model_dump(exclude_none=True).items():
                    values[_FIELD.get((section, key), key)] = value
        return cls(**values)

    def reload_needed(self, other: ServingConfig) -> bool:
        """Thread count is fixed when onnxruntime builds the session."""
        return self.threads != other.threads


_FIELD = {
    ("router", "policy"): "router_policy",
    ("telemetry", "batch_size"): "telemetry_batch_size",
    ("telemetry", "flush_interval_s"): "telemetry_flush_interval_s",
}
