"""Small, valid wire objects for tests that need one and care about a field or two."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from shared.blobs import describe_bytes
from shared.manifest import FileEntry, IOSignature, Manifest, Quantization
from shared.messages import TelemetryRecord


def make_manifest(**override: Any) -> Manifest:
    fields: dict[str, Any] = {
        "name": "tiny",
        "version": "1",
        "created_at": datetime(2026, 11, 24, tzinfo=UTC),
        "architecture": "GlmForCausalLM",
        "parameters": 1000,
        "files": [FileEntry(path="model.onnx", role="graph", blob=describe_bytes(b"graph bytes", 4))],
        "io": IOSignature(
            inputs=[],
            outputs=[],
            num_layers=2,
            num_kv_heads=2,
            head_dim=8,
            vocab_size=64,
            context_length=32,
            model_type="glm",
        ),
        "quantization": Quantization(method="none", weight_type="float32"),
    }
    fields.update(override)
    return Manifest(**fields)


def make_telemetry_record(**override: Any) -> TelemetryRecord:
    """One local request's telemetry: a successful one of 1 + 1 tokens in 1 ms, unless told."""
    fields: dict[str, Any] = {
        "id": "record-00000001",
        "at": datetime(2026, 12, 7, 12, 0, tzinfo=UTC),
        "model": "m",
        "served_by": "local",
        "prompt_tokens": 1,
        "completion_tokens": 1,
        "latency_ms": 1.0,
    }
    return TelemetryRecord(**(fields | override))
