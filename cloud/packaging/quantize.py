"""Weight quantization of an exported graph."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cloud.packaging.nbits_fusion import fuse_layers
from shared.errors import PackagingError
from shared.manifest import Quantization

QUANTIZATIONS = ("int8", "int4", "none")
# Weight bits of the weight-only methods.
WEIGHT_BITS = {"int8": 8, "int4": 4}
# Block sizes, measured on the Llama-134M bench (bench/RESULTS.md). int8 128: 7-12 % faster decode
# than 256 and 2-7 % faster than 64 (paired runs in one process, AMD EPYC VM); the Intel Xeon VM
# agreed on 128 over 256 and 64. int4 128: 1.6x the speed of blocks of 32 (439 vs 279 tok/s), and
# the demo model's perplexity rose 0.2% (32: 0.4%); the packager's perplexity gate refuses a model
# that 4-bit blocks of 128 would harm more than --max-ppl-increase.
BLOCK_SIZE = {8: 128, 4: 128}


def quantization_record(method: str) -> Quantization:
    if method == "int8":
        return Quantization(method="int8-weight-only", weight_type="int8")
    if method == "int4":
        return Quantization(method="int4-weight-only", weight_type="int4")
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


def _nbits_quantizer() -> tuple[Any, Any]:
    """onnxruntime's weight-only quantizer classes, without the ``logging.basicConfig(level=INFO)``
    its module runs at import: that would turn on every library's INFO lines in the caller's process."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    return nbits.DefaultWeightOnlyQuantConfig, nbits.MatMulNBitsQuantizer


def weight_block_size(bits: int, hidden_size: int) -> int:
    """The block size for ``bits``, or the largest power of two MLAS supports that fits a row."""
    block = BLOCK_SIZE[bits]
    while block > 16 and block > hidden_size:
        block //= 2
    return block


def quantize_weight_only(src_graph: Path, out_graph: Path, bits: int, block_size: int) -> Path:
    """Weight-only int8 or int4 (symmetric, per block) as MatMulNBits with int8 compute.

    Measured on the Llama-134M bench: int8 runs at 1.6× the decode speed of quantize_dynamic's
    MatMulInteger on an AMD EPYC VM (level on an Intel Xeon one), and int4 at about twice int8.
    Activations are quantized per block inside the kernel (accuracy_level 4); levels 1-3 (float
    compute) have no fast 8-bit kernel on CPU (10 tok/s). Each gated MLP then becomes one function
    node, and each skip-norm joins the matmul after it (nbits_fusion.py): the edge's kernel library
    runs them, and onnxruntime inlines their bodies wherever it is not registered."""
    if bits not in BLOCK_SIZE:
        raise PackagingError(f"weight-only quantization takes 8 or 4 bits, not {bits}")
    import onnx
    from onnxruntime.quantization import QuantFormat

    DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer = _nbits_quantizer()

    out_graph.parent.mkdir(parents=True, exist_ok=True)
    config = DefaultWeightOnlyQuantConfig(
        block_size=block_size,
        is_symmetric=True,
        accuracy_level=4,
        bits=bits,
        quant_format=QuantFormat.QOperator,
    )
    try:
        with quiet_quantizer():
            quantizer = MatMulNBitsQuantizer(onnx.load(str(src_graph)), algo_config=config)
            quantizer.process()
            quantized = sum(n.op_type == "MatMulNBits" for n in quantizer.model.model.graph.node)
            fuse_layers(quantizer.model.model)
            quantizer.model.save_model_to_file(str(out_graph), use_external_data_format=True)
    except Exception as exc:
        raise PackagingError(f"int{bits} quantization failed: {exc}", graph=str(src_graph)) from exc
    if quantized == 0:
        raise PackagingError(
            f"int{bits} quantization found no weight MatMul to quantize", graph=str(src_graph)
        )
    return out_graph
