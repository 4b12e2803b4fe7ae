"""Weight quantization of an exported graph."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from shared.errors import PackagingError
from shared.manifest import Quantization

QUANTIZATIONS = ("int8", "none")


def quantization_record(method: str) -> Quantization:
    if method == "int8":
        return Quantization(method="int8-dynamic", weight_type="int8")
    if method == "none":
        return Quantization(method="none", weight_type="float32")
    raise PackagingError(f"unknown quantization {method!r}; choose one of {', '.join(QUANTIZATIONS)}")


class _QuantizerNoise(logging.Filter):
    """onnxruntime's quantizer logs on the root logger, once per integer tensor it (rightly) skips."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "onnxruntime/quantization" not in record.pathname.replace("\\", "/")


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    noise = _QuantizerNoise()
    root = logging.getLogger()
    root.addFilter(noise)
    try:
        yield
    finally:
        root.removeFilter(noise)


def quantize_int8(src_graph: Path, out_graph: Path) -> Path:
    """Dynamic int8 (QInt8 weights, per-channel); FACTS.md: beats optimum's ORTQuantizer here."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out_graph.parent.mkdir(parents=True, exist_ok=True)
    try:
        with _quiet_quantizer():
            quantize_dynamic(
                str(src_graph),
                str(out_graph),
                weight_type=QuantType.QInt8,
                per_channel=True,
                use_external_data_format=src_graph.stat().st_size > 1_800_000_000,
            )
    except Exception as exc:
        raise PackagingError(f"int8 quantization failed: {exc}", graph=str(src_graph)) from exc
    return out_graph
