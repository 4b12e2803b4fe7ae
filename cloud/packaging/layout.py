"""Where to cut a package's weights into chunks: at the tensor boundaries of its ONNX graphs.

A fine-tune, or a re-quantization of some layers, rewrites whole tensors. With chunks every
``chunk_size`` bytes from the start of the weights file each changed tensor also drags in the
chunks it shares with its neighbours (a 1.28 MiB tensor in 1 MiB chunks: 1.9x its bytes on the
wire); cut where tensors start and end, a delta update sends the changed tensors and nothing else
(issue 17). A tensor longer than the chunk size is split into equal pieces within itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import onnx
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from shared.errors import PackagingError


def tensor_cuts(graphs: Iterable[Path]) -> dict[str, list[int]]:
    """For each external-data file these ONNX graphs name (by file name, relative to the graph),
    the sorted offsets where a tensor starts or ends."""
    cuts: dict[str, set[int]] = {}
    for graph in graphs:
        try:
            model = onnx.load(str(graph), load_external_data=False)
        except Exception as exc:  # onnx raises DecodeError, OSError and its own errors
            raise PackagingError(f"cannot read the ONNX graph {graph.name}: {exc}", path=str(graph)) from exc
        for tensor in _tensors(model.graph):
            if not uses_external_data(tensor):
                continue
            try:
                info = ExternalDataInfo(tensor)
                offset = int(info.offset or 0)
                length = int(info.length) if info.length else tensor_nbytes(tensor)
                location = Path(info.location).as_posix()
            except (TypeError, ValueError) as exc:
                raise PackagingError(
                    f"tensor {tensor.name!r} of {graph.name} has unreadable external data: {exc}",
                    path=str(graph),
                ) from exc
            points = cuts.setdefault(location, set())
            points.add(offset)
            if length:
                points.add(offset + length)
    return {location: sorted(points) for location, points in cuts.items()}


def tensor_nbytes(tensor: onnx.TensorProto) -> int:
    """The bytes of a tensor whose external data gives no length: its shape times its element
    size (0, so only its start is cut, for a type without a fixed size)."""
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return 0
    packed = {getattr(onnx.TensorProto, name, -1) for name in ("INT4", "UINT4", "FLOAT4E2M1")}
    if tensor.data_type == onnx.TensorProto.STRING or tensor.data_type in packed:
        return 0
    count = 1
    for dim in tensor.dims:
        count *= dim
    return count * itemsize


def _tensors(graph: onnx.GraphProto) -> Iterable[onnx.TensorProto]:
    """Initializers and constant attributes, in subgraphs too (If/Loop bodies)."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)
