"""Weight quantization of an exported graph."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from shared.errors import PackagingError
from shared.manifest import Quantization

QUANTIZATIONS = ("int8", "none")


# Weight-only int8 block size: the largest MLAS supports; fewer scales to read per token.
INT8_BLOCK_SIZE = 256


def quantization_record(method: str) -> Quantization:
    if method == "int8":
        return Quantization(method="int8-weight-only", weight_type="int8")
    if method == "none":
        return Quantization(method="none", weight_type="float32")
    raise PackagingError(f"unknown quantization {method!r}; choose one of {', '.join(QUANTIZATIONS)}")


class _QuantizerNoise(logging.Filter):
    """onnxruntime's quantizer logs on the root logger, once per integer tensor it (rightly) skips."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "onnxruntime/quantization" not in record.pathname.replace("\\", "/")


@contextlib.contextmanager
def quiet_quantizer() -> Iterator[None]:
    noise = _QuantizerNoise()
    root = logging.getLogger()
    root.addFilter(noise)
    # The weight-only quantizer has its own handler and logs every MatMul at INFO.
    nbits = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = nbits.level
    nbits.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.removeFilter(noise)
        nbits.setLevel(level)


def int8_block_size(hidden_size: int) -> int:
    """256, or the largest power of two MLAS supports that fits a row of a small model."""
    block = INT8_BLOCK_SIZE
    while block > 16 and block > hidden_size:
        block //= 2
    return block


def quantize_int8(src_graph: Path, out_graph: Path, block_size: int = INT8_BLOCK_SIZE) -> Path:
    """Weight-only int8 (symmetric, blocks of 256) as MatMulNBits with int8 compute.

    Measured on the Llama-134M bench: 1.6× the decode speed of quantize_dynamic's MatMulInteger
    (which quantizes activations per tensor with extra nodes on every step). Activations are
    quantized per block inside the kernel (accuracy_level 4), so quality is at least as good."""
    import onnx
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    out_graph.parent.mkdir(parents=True, exist_ok=True)
    config = DefaultWeightOnlyQuantConfig(
        block_size=block_size,
        is_symmetric=True,
        accuracy_level=4,
        bits=8,
        quant_format=QuantFormat.QOperator,
    )
    try:
        with quiet_quantizer():
            quantizer = MatMulNBitsQuantizer(onnx.load(str(src_graph)), algo_config=config)
            quantizer.process()
            quantized = sum(n.op_type == "MatMulNBits" for n in quantizer.model.model.graph.node)
            quantizer.model.save_model_to_file(str(out_graph), use_external_data_format=True)
    except Exception as exc:
        raise PackagingError(f"int8 quantization failed: {exc}", graph=str(src_graph)) from exc
    if quantized == 0:
        raise PackagingError("int8 quantization found no weight MatMul to quantize", graph=str(src_graph))
    return out_graph
