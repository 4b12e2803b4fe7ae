"""A graph's layer nodes folded into its weight matmuls, as model-local functions.

The fused decoder (fused.py) writes a layer's norm as ``SkipSimplifiedLayerNormalization`` and
its gated MLP as gate and up MatMuls, a Sigmoid and two Muls; quantization (quantize.py) turns
the MatMuls into ``MatMulNBits``. This pass replaces, in the ``ai.autoglm`` domain:

* gate, up, Sigmoid, Mul, Mul → ``MatMulNBitsSwiGLU`` (A, gate B, gate scales, up B, up scales);
* a skip-norm whose normed output only one ``MatMulNBits`` reads (the packed QKV projection) →
  ``SkipRMSNormMatMulNBits`` (A, skip, gamma, B, scales) → (Y, A + skip); where only an Add of a
  constant vector [N] reads that matmul's output (Qwen2's and GLM's q/k/v bias) the Add too →
  ``SkipRMSNormMatMulNBitsBias`` (A, skip, gamma, B, scales, bias);
* a skip-norm whose normed output only a ``MatMulNBitsSwiGLU`` reads → ``SkipRMSNormSwiGLU``;

and in an fp32 graph (``fuse_layers`` on the graph the packager ships unquantized), over MatMuls
whose weights are a constant float matrix: ``MatMulFloatSwiGLU`` (A, gate W, up W),
``SkipRMSNormMatMulFloat`` (A, skip, gamma, W) (``SkipRMSNormMatMulFloatBias`` with a bias
Add after it), ``SkipRMSNormSwiGLUFloat`` (A, skip, gamma,
gate W, up W), and every other such MatMul ``MatMulFloat`` (A, W): the edge's kernels stream
float weights faster than onnxruntime's MatMul and run five nodes per layer instead of ten
(edge_agent/runtime/kernels/matmul_float.c).

Each is a model-local function whose body is exactly the nodes it replaces. Where the edge's
kernel library is registered, onnxruntime runs the node with the library's op (a function node
that some kernel takes is not inlined: SmolLM2's decode step runs 155 nodes instead of 335, and
the gate and up quantize their activations once); anywhere else (no library, another CPU, the
CUDA provider, the packager's own checks) onnxruntime inlines the body and runs the graph it ran
before, node for node.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

DOMAIN = "ai.autoglm"
SWIGLU = "MatMulNBitsSwiGLU"
NORM_MATMUL = "SkipRMSNormMatMulNBits"
NORM_MATMUL_BIAS = "SkipRMSNormMatMulNBitsBias"
NORM_SWIGLU = "SkipRMSNormSwiGLU"
FLOAT_MATMUL = "MatMulFloat"
FLOAT_SWIGLU = "MatMulFloatSwiGLU"
FLOAT_NORM_MATMUL = "SkipRMSNormMatMulFloat"
FLOAT_NORM_MATMUL_BIAS = "SkipRMSNormMatMulFloatBias"
FLOAT_NORM_SWIGLU = "SkipRMSNormSwiGLUFloat"
FUSED_OPS = (
    SWIGLU,
    NORM_MATMUL,
    NORM_MATMUL_BIAS,
    NORM_SWIGLU,
    FLOAT_MATMUL,
    FLOAT_SWIGLU,
    FLOAT_NORM_MATMUL,
    FLOAT_NORM_MATMUL_BIAS,
    FLOAT_NORM_SWIGLU,
)
# A norm-matmul op and its form with the bias Add after it.
_BIASED = {NORM_MATMUL: NORM_MATMUL_BIAS, FLOAT_NORM_MATMUL: FLOAT_NORM_MATMUL_BIAS}
# The MatMulNBits attributes a function passes through (by reference) to its body's nodes.
_NBITS = ("K", "N", "bits", "block_size", "accuracy_level")


def function_bodies(opset: int) -> list[Any]:
    """Every fused op's model-local function (FunctionProto) for a graph of default-domain opset
    ``opset``: its body the onnxruntime nodes it replaces."""
    from onnx import AttributeProto, helper

    def nbits(name: str, a: str, weights: str, scales: str, out: str) -> Any:
        node = helper.make_node("MatMulNBits", [a, weights, scales], [out], name=name, domain="com.microsoft")
        node.attribute.extend(helper.make_attribute_ref(x, AttributeProto.INT) for x in _NBITS)
        return node

    def swiglu(a: str) -> list[Any]:
        return [
            nbits("gate", a, "gate_B", "gate_scales", "g"),
            nbits("up", a, "up_B", "up_scales", "u"),
            helper.make_node("Sigmoid", ["g"], ["sigmoid"], name="Sigmoid"),
            helper.make_node("Mul", ["g", "sigmoid"], ["silu"], name="SiLU"),
            helper.make_node("Mul", ["silu", "u"], ["Y"], name="Mul"),
        ]

    def matmul(name: str, a: str, weights: str, out: str) -> Any:
        return helper.make_node("MatMul", [a, weights], [out], name=name)

    def swiglu_float(a: str) -> list[Any]:
        return [
            matmul("gate", a, "gate_W", "g"),
            matmul("up", a, "up_W", "u"),
            helper.make_node("Sigmoid", ["g"], ["sigmoid"], name="Sigmoid"),
            helper.make_node("Mul", ["g", "sigmoid"], ["silu"], name="SiLU"),
            helper.make_node("Mul", ["silu", "u"], ["Y"], name="Mul"),
        ]

    norm = helper.make_node(
        "SkipSimplifiedLayerNormalization",
        ["A", "skip", "gamma"],
        ["normed", "", "", "sum"],
        name="SkipRMSNorm",
        domain="com.microsoft",
    )
    norm.attribute.append(helper.make_attribute_ref("epsilon", AttributeProto.FLOAT))
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
    pair = ["gate_B", "gate_scales", "up_B", "up_scales"]
    add_bias = helper.make_node("Add", ["unbiased", "bias"], ["Y"], name="Bias")
    return [
        helper.make_function(DOMAIN, SWIGLU, ["A", *pair], ["Y"], swiglu("A"), opsets, list(_NBITS)),
        helper.make_function(
            DOMAIN,
            NORM_MATMUL,
            ["A", "skip", "gamma", "B", "scales"],
            ["Y", "sum"],
            [norm, nbits("matmul", "normed", "B", "scales", "Y")],
            opsets,
            [*_NBITS, "epsilon"],
        ),
        helper.make_function(
            DOMAIN,
            NORM_MATMUL_BIAS,
            ["A", "skip", "gamma", "B", "scales", "bias"],
            ["Y", "sum"],
            [norm, nbits("matmul", "normed", "B", "scales", "unbiased"), add_bias],
            opsets,
            [*_NBITS, "epsilon"],
        ),
        helper.make_function(
            DOMAIN,
            NORM_SWIGLU,
            ["A", "skip", "gamma", *pair],
            ["Y", "sum"],
            [norm, *swiglu("normed")],
            opsets,
            [*_NBITS, "epsilon"],
        ),
        helper.make_function(
            DOMAIN, FLOAT_MATMUL, ["A", "W"], ["Y"], [matmul("matmul", "A", "W", "Y")], opsets, []
        ),
        helper.make_function(
            DOMAIN, FLOAT_SWIGLU, ["A", "gate_W", "up_W"], ["Y"], swiglu_float("A"), opsets, []
        ),
        helper.make_function(
            DOMAIN,
            FLOAT_NORM_MATMUL,
            ["A", "skip", "gamma", "W"],
            ["Y", "sum"],
            [norm, matmul("matmul", "normed", "W", "Y")],
            opsets,
            ["epsilon"],
        ),
        helper.make_function(
            DOMAIN,
            FLOAT_NORM_MATMUL_BIAS,
            ["A", "skip", "gamma", "W", "bias"],
            ["Y", "sum"],
            [norm, matmul("matmul", "normed", "W", "unbiased"), add_bias],
            opsets,
            ["epsilon"],
        ),
        helper.make_function(
            DOMAIN,
            FLOAT_NORM_SWIGLU,
            ["A", "skip", "gamma", "gate_W", "up_W"],
            ["Y", "sum"],
            [norm, *swiglu_float("normed")],
            opsets,
            ["epsilon"],
        ),
    ]


def _nbits_attrs(node: Any) -> dict[str, int]:
    return {a.name: a.i for a in node.attribute if a.name in _NBITS}


class _Graph:
    """Who produces and who reads each tensor of a graph."""

    def __init__(self, graph: Any) -> None:
        self.producer = {out: node for node in graph.node for out in node.output if out}
        self.readers: dict[str, list[Any]] = {}
        for node in graph.node:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)
        self.outputs = {out.name for out in graph.output}
        # Float matrices among the initializers: weights the float ops can take (not one a graph
        # input of the same name can override at run time: the op packs its weights once).
        inputs = {value.name for value in graph.input}
        self.float_matrices = {
            init.name: tuple(init.dims)
            for init in graph.initializer
            if init.data_type == 1 and len(init.dims) == 2 and init.name not in inputs
        }
        # and float vectors (a bias the op adds as it stores its outputs), by length
        self.float_vectors = {
            init.name: int(init.dims[0])
            for init in graph.initializer
            if init.data_type == 1 and len(init.dims) == 1 and init.name not in inputs
        }

    def only_reader(self, name: str) -> Any | None:
        """The one node reading ``name``, if exactly one does and it is not a graph output."""
        readers = self.readers.get(name, [])
        return readers[0] if len(readers) == 1 and name not in self.outputs else None

    def unread(self, name: str) -> bool:
        return not name or (not self.readers.get(name) and name not in self.outputs)


def _plain_nbits(node: Any | None) -> bool:
    """A MatMulNBits of weights and scales alone (no zero points, g_idx or bias: the library's
    fused ops pack none of them)."""
    return (
        node is not None
        and node.op_type == "MatMulNBits"
        and node.domain == "com.microsoft"
        and len(node.input) == 3
        and all(node.input)
        and {"K", "N", "bits", "block_size"} <= set(_nbits_attrs(node))
    )


def _bias_add(matmul: Any, n: int, g: _Graph) -> tuple[Any, str] | None:
    """The Add that alone reads ``matmul``'s output and adds a constant float vector of its N
    columns to it (a q/k/v bias), and that vector's name."""
    add = g.only_reader(matmul.output[0])
    if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.input) != 2:
        return None
    other = add.input[1] if add.input[0] == matmul.output[0] else add.input[0]
    if other == matmul.output[0] or g.float_vectors.get(other) != n:
        return None
    return add, other


def _renamed(node: Any, suffix: str) -> str:
    """The fused node's name: the first replaced node's, suffixed; none where that had none (two
    nodes may not share a name)."""
    return f"{node.name}/{suffix}" if node.name else ""


def _float_matmul(node: Any | None, g: _Graph) -> bool:
    """A MatMul of activations by a constant float matrix [K, N] (the float ops pack it)."""
    return (
        node is not None
        and node.op_type == "MatMul"
        and node.domain in ("", "ai.onnx")
        and len(node.input) == 2
        and node.input[1] in g.float_matrices
        and node.input[0] not in g.float_matrices
        and min(g.float_matrices[node.input[1]]) > 0
    )


def _rewrite(graph: Any, groups: list[tuple[list[Any], Any]]) -> None:
    """Each group's nodes out, its new node in at the place of the group's first node: the new
    node reads only what that node's inputs and initializers are, and whatever reads its outputs
    comes after the group's nodes, so the order stays topological."""
    gone = {id(node) for old, _ in groups for node in old}
    order = {id(node): i for i, node in enumerate(graph.node)}
    at = {id(min(old, key=lambda node: order[id(node)])): new for old, new in groups}
    nodes = []
    for node in graph.node:
        if id(node) in at:
            nodes.append(at[id(node)])
        elif id(node) not in gone:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


def _fuse_swiglu(graph: Any) -> int:
    from onnx import helper

    g = _Graph(graph)
    groups = []
    for mul in graph.node:
        if mul.op_type != "Mul" or mul.domain not in ("", "ai.onnx") or len(mul.input) != 2:
            continue
        silu = g.producer.get(mul.input[0])
        if silu is None or silu.op_type != "Mul" or len(silu.input) != 2:
            continue
        sigmoid = g.producer.get(silu.input[1])
        if sigmoid is None or sigmoid.op_type != "Sigmoid" or sigmoid.input[0] != silu.input[0]:
            continue
        gate: Any = g.producer.get(silu.input[0])
        up: Any = g.producer.get(mul.input[1])
        if gate is None or up is None or gate is up or gate.input[0] != up.input[0]:
            continue
        if _plain_nbits(gate) and _plain_nbits(up) and _nbits_attrs(gate) == _nbits_attrs(up):
            op, weights = SWIGLU, [gate.input[1], gate.input[2], up.input[1], up.input[2]]
        elif (
            _float_matmul(gate, g)
            and _float_matmul(up, g)
            and g.float_matrices[gate.input[1]] == g.float_matrices[up.input[1]]
        ):
            op, weights = FLOAT_SWIGLU, [gate.input[1], up.input[1]]
        else:
            continue
        # Nothing else may read what the fused node no longer produces.
        if len(g.readers.get(gate.output[0], [])) != 2 or gate.output[0] in g.outputs:
            continue
        if not all(g.only_reader(x.output[0]) is not None for x in (sigmoid, silu, up)):
            continue
        fused = helper.make_node(
            op, [gate.input[0], *weights], [mul.output[0]], name=_renamed(gate, "SwiGLU"), domain=DOMAIN
        )
        fused.attribute.extend(helper.make_attribute(k, v) for k, v in _nbits_attrs(gate).items())
        groups.append(([gate, up, sigmoid, silu, mul], fused))
    _rewrite(graph, groups)
    return len(groups)


def _fuse_norms(graph: Any) -> int:
    from onnx import helper

    g = _Graph(graph)
    groups = []
    for norm in graph.node:
        if norm.op_type != "SkipSimplifiedLayerNormalization" or norm.domain != "com.microsoft":
            continue
        outs = list(norm.output) + [""] * (4 - len(norm.output))
        if (
            len(norm.input) != 3
            or not all(norm.input)
            or not outs[3]
            or not all(g.unread(x) for x in outs[1:3])
        ):
            continue
        reader = g.only_reader(outs[0])
        if reader is None or reader.input[0] != outs[0]:
            continue
        if _plain_nbits(reader):
            op = NORM_MATMUL
        elif reader.op_type == SWIGLU and reader.domain == DOMAIN:
            op = NORM_SWIGLU
        elif _float_matmul(reader, g):
            op = FLOAT_NORM_MATMUL
        elif reader.op_type == FLOAT_SWIGLU and reader.domain == DOMAIN:
            op = FLOAT_NORM_SWIGLU
        else:
            continue
        weights = list(reader.input[1:])
        eps = next((a.f for a in norm.attribute if a.name == "epsilon"), None)
        if eps is None:  # the op's default is onnxruntime's business: fuse only an explicit one
            continue
        nodes, out = [norm, reader], reader.output[0]
        if op in _BIASED:
            n = _nbits_attrs(reader)["N"] if op == NORM_MATMUL else g.float_matrices[reader.input[1]][1]
            biased = _bias_add(reader, n, g)
            if biased is not None:
                op, out = _BIASED[op], biased[0].output[0]
                nodes.append(biased[0])
                weights.append(biased[1])
        fused = helper.make_node(
            op,
            [norm.input[0], norm.input[1], norm.input[2], *weights],
            [out, outs[3]],
            name=_renamed(norm, op),
            domain=DOMAIN,
            epsilon=eps,
        )
        fused.attribute.extend(helper.make_attribute(k, v) for k, v in _nbits_attrs(reader).items())
        groups.append((nodes, fused))
    _rewrite(graph, groups)
    return len(groups)


def _fuse_float_matmuls(graph: Any) -> int:
    """Every MatMul by a constant float matrix left → MatMulFloat."""
    from onnx import helper

    g = _Graph(graph)
    groups = [
        (
            [node],
            helper.make_node(
                FLOAT_MATMUL, list(node.input), list(node.output), name=_renamed(node, "Float"), domain=DOMAIN
            ),
        )
        for node in graph.node
        if _float_matmul(node, g)
    ]
    _rewrite(graph, groups)
    return len(groups)


def fuse_layers(model: Any) -> dict[str, int]:
    """Rewrites ``model`` (an onnx ModelProto) in place: gated MLPs first, then the skip-norms in
    front of a matmul, then the float matmuls left. Returns how many nodes of each fused op it wrote.

    A group is fused only when it is exactly what the op computes and nothing else reads what the
    fused node no longer produces (the normed activations, the gate's output, the SiLU, the
    matmul's output before its bias)."""
    _fuse_swiglu(model.graph)
    _fuse_norms(model.graph)
    _fuse_float_matmuls(model.graph)
    counts = dict.fromkeys(FUSED_OPS, 0)
    for node in model.graph.node:
        if node.domain == DOMAIN and node.op_type in counts:
            counts[node.op_type] += 1
    if any(counts.values()):
        used = {name for name, n in counts.items() if n}
        add_functions(model, lambda opset: [f for f in function_bodies(opset) if f.name in used])
    return counts


def add_functions(model: Any, make: Callable[[int], Iterable[Any]]) -> None:
    """Adds to ``model`` the functions ``make(opset)`` returns (for the model's default-domain
    opset) that it does not hold yet, and imports the ``ai.autoglm`` domain their nodes use."""
    from onnx import helper

    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    have = {(f.domain, f.name) for f in model.functions}
    model.functions.extend(f for f in make(opset) if (f.domain, f.name) not in have)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))


def fuse_file(graph: Path, out: Path | None = None) -> dict[str, int]:
    """:func:`fuse_layers` on the graph file ``graph``, written to ``out`` (in the same folder: its
    external weights are neither read nor moved; default: ``graph`` itself) where it changed."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    counts = fuse_layers(model)
    if any(counts.values()):
        onnx.save(model, str(out or graph))
    return counts
