"""A fused graph's KV cache in half precision: every GroupQueryAttention as ``ai.autoglm``'s
``GroupQueryAttentionHalfKV``, a model-local function.

Why: a decode step reads each sequence's whole KV cache once per layer; in float that is the
largest read after the weights (SmolLM2-135M: 46 KB per position, so 14 MB per sequence and step
at 300 positions), and with 2-4 sequences decoding together (parallel slots) the attention grows
with every row while the weights are read once. Half precision halves the cache's memory and its
reads; llama.cpp keeps its cache in f16 by default.

How: the function takes GroupQueryAttention's inputs in its order, with past and present key and
value in float16 and everything else (query, key, value, cos/sin caches, output) float, so the
graph around the node is unchanged. Its body casts the floats to half around onnxruntime's
float16 GroupQueryAttention and the output back: a session without the edge's kernel library (or
on the CUDA provider) inlines it and runs that. Where the library is registered, its op of that
name runs instead (edge_agent/runtime/kernels/group_query_attention.c): the attention in floats,
each cached key and value widened as it is read, so only the cache's rounding differs from the
float graph (keys are rotated in float, then rounded).

The graph's past and present inputs and outputs become float16; the edge allocates its cache in
the graph's type (edge_agent/runtime/session.py), the manifest's ``io.kv_dtype`` says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cloud.packaging.nbits_fusion import DOMAIN, add_functions

OP = "GroupQueryAttentionHalfKV"
_GQA_INPUTS = (
    "query",
    "key",
    "value",
    "past_key",
    "past_value",
    "seqlens_k",
    "total_sequence_length",
    "cos_cache",
    "sin_cache",
)
# GroupQueryAttention's attributes a fused graph sets, passed through by reference (an attribute
# the node leaves out is left out of the inlined body too: onnxruntime's default applies).
_ATTRIBUTES = {
    "num_heads": "INT",
    "kv_num_heads": "INT",
    "do_rotary": "INT",
    "rotary_interleaved": "INT",
    "local_window_size": "INT",
    "scale": "FLOAT",
}


def _function(opset: int, packed: bool, rotary: bool) -> Any:
    """The function for a graph whose attention takes packed QKV (or separate Q, K, V) and cos/sin
    caches (or none): a missing input cannot be cast, so the body casts only the given ones."""
    from onnx import AttributeProto, TensorProto, helper

    half = TensorProto.FLOAT16
    casts, args = [], []
    for name in _GQA_INPUTS:
        given = name in ("query", "past_key", "past_value", "seqlens_k", "total_sequence_length")
        given |= (name in ("key", "value") and not packed) or (name in ("cos_cache", "sin_cache") and rotary)
        if not given:
            args.append("")
        elif name in ("query", "key", "value", "cos_cache", "sin_cache"):
            casts.append(helper.make_node("Cast", [name], [f"{name}_half"], name=f"Cast_{name}", to=half))
            args.append(f"{name}_half")
        else:
            args.append(name)
    gqa = helper.make_node(
        "GroupQueryAttention",
        args,
        ["output_half", "present_key", "present_value"],
        name="GroupQueryAttention",
        domain="com.microsoft",
    )
    gqa.attribute.extend(
        helper.make_attribute_ref(a, getattr(AttributeProto, kind)) for a, kind in _ATTRIBUTES.items()
    )
    out = helper.make_node("Cast", ["output_half"], ["output"], name="Cast_output", to=TensorProto.FLOAT)
    return helper.make_function(
        DOMAIN,
        OP,
        list(_GQA_INPUTS),
        ["output", "present_key", "present_value"],
        [*casts, gqa, out],
        [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)],
        list(_ATTRIBUTES),
    )


def half_kv_cache(model: Any) -> int:
    """Rewrite ``model`` (an onnx ModelProto of a fused decoder) in place: its GroupQueryAttention
    nodes as GroupQueryAttentionHalfKV, its past/present tensors float16. Returns how many nodes
    changed (0: no float GroupQueryAttention, e.g. a generic export, which is left as it was)."""
    from onnx import TensorProto

    graph = model.graph
    nodes = [n for n in graph.node if n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft"]
    if not nodes:
        return 0
    kinds = {(not n.input[1], len(n.input) > 7 and bool(n.input[7])) for n in nodes}
    if len(kinds) != 1:
        raise ValueError("the graph's attention nodes differ in their inputs (packed QKV, rotary)")
    ((packed, rotary),) = kinds
    cache = set()
    for n in nodes:
        cache.update(n.input[3:5])
        cache.update(n.output[1:3])
        n.domain, n.op_type = DOMAIN, OP
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.name in cache:
            if value.type.tensor_type.elem_type != TensorProto.FLOAT:
                raise ValueError(f"KV cache tensor {value.name} is not float")
            value.type.tensor_type.elem_type = TensorProto.FLOAT16
    add_functions(model, lambda opset: [_function(opset, packed, rotary)])
    return len(nodes)


def half_kv_file(graph: Path, out: Path | None = None) -> int:
    """:func:`half_kv_cache` on the graph file ``graph``, written to ``out`` (in the same folder:
    its external weights are neither read nor moved; default: ``graph`` itself) where it changed."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    changed = half_kv_cache(model)
    if changed:
        onnx.save(model, str(out or graph))
    return changed
