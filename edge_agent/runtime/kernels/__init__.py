"""The edge's own CPU kernels: an onnxruntime custom-op library built from this folder's C files
when the package is installed (pyproject.toml, ``tool.setuptools.ext-modules``; optional).

It replaces onnxruntime's MatMulNBits (the quantized weight matmuls of int8 and int4 graphs) and
GroupQueryAttention (the fused graphs' attention) on x86-64 CPUs with AVX-512 VNNI or AVX2 (each op
has routines for either), and runs the ``ai.autoglm`` ops the packager writes as model-local
functions (a gated MLP, and a skip-norm with the matmul after it, as one node each, over quantized
or, in an fp32 graph, float weights: cloud/packaging/nbits_fusion.py; the attention over a float16
KV cache: cloud/packaging/half_kv.py),
whose bodies onnxruntime inlines where the library is absent;
:class:`~edge_agent.runtime.session.OnnxCausalLM` registers it and loads the graph on onnxruntime's
own kernels wherever the session refuses it (a graph it does not take).
The runtime setting ``kernels: onnxruntime`` leaves it out. The environment variable
``AUTOGLM_KERNELS_ISA=avx2`` makes a CPU with AVX-512 run what an AVX2-only one runs (tests and
benchmarks compare the two). On CPUs with AMX, MatMulNBits multiplies calls of more than 4 rows
(prefills) on AMX tiles, bit for bit what the VNNI tile computes; ``AUTOGLM_KERNELS_AMX=0`` turns
that off. Decode steps prefetch the weights ahead of their loads on Intel's CPUs, and on AMD's
only the AVX-512 tile's lone 8-bit rows, and the attention its KV cache on both (measured faster
so on each);
``AUTOGLM_KERNELS_PREFETCH=0`` (none) or ``1`` (all) overrides that. The agent's settings refuse
other values of these variables at start-up (:func:`environment_problems`).
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent


# The variables the C library reads when each op is created, and the values it acts on. It takes
# any other value as unset, so a typo ("AMX=off") would silently leave the default in place:
# environment_problems() lets the agent refuse it at start-up instead.
ENVIRONMENT: dict[str, tuple[str, ...]] = {
    "AUTOGLM_KERNELS_ISA": ("avx2",),
    "AUTOGLM_KERNELS_AMX": ("0", "1"),
    "AUTOGLM_KERNELS_PREFETCH": ("0", "1"),
}


def environment_problems(env: Mapping[str, str]) -> list[str]:
    """Each ``AUTOGLM_KERNELS_*`` variable in ``env`` the library would ignore, with the values it
    takes (an unknown name of that prefix too: a misspelt variable is as silent as a bad value)."""
    problems = []
    for name, value in sorted(env.items()):
        if not name.startswith("AUTOGLM_KERNELS_"):
            continue
        allowed = ENVIRONMENT.get(name)
        if allowed is None:
            problems.append(f"{name}: unknown variable (known: {', '.join(ENVIRONMENT)})")
        elif value not in allowed:
            problems.append(f"{name}={value!r}: must be {' or '.join(allowed)} (or unset)")
    return problems


def built() -> Path | None:
    """The library the install built, or None where it could not (no C compiler)."""
    found = sorted(_HERE.glob("_kernels*.so"))
    return found[0] if found else None


@functools.cache
def library() -> Path | None:
    """The built library when this CPU runs it, else None (onnxruntime's kernels, without first
    trying a session that would refuse the library)."""
    path = built()
    if path is None:
        return None
    try:
        usable = bool(ctypes.CDLL(str(path)).AutoglmKernelsUsable())
    except (OSError, AttributeError) as exc:  # a stale or foreign file
        log.warning("kernel library %s cannot be used: %s", path, exc)
        return None
    return path if usable else None


def _ask(symbol: str) -> int | None:
    """What the library's function ``symbol`` answers on this CPU now, or None where the library
    does not run here or is an older build without it."""
    path = library()
    if path is None:
        return None
    try:
        return int(getattr(ctypes.CDLL(str(path)), symbol)())
    except AttributeError:
        return None


def isa() -> str | None:
    """The instruction set the library uses on this CPU now ("avx512-vnni" or "avx2"), or None
    where it does not run (for benchmark tables and logs)."""
    return {3: "avx512-vnni", 2: "avx2"}.get(_ask("AutoglmKernelsIsa") or 0)


def amx() -> bool:
    """Whether MatMulNBits runs calls of more than 4 rows (prefills) on AMX tiles here: an AVX-512
    CPU with AMX-INT8 (Intel Xeon since Sapphire Rapids), Linux granting the tile state, and
    ``AUTOGLM_KERNELS_AMX`` not ``0``. Decode steps of 1-4 rows run the AVX-512 VNNI tile either way."""
    return bool(_ask("AutoglmKernelsAmx"))


PREFETCH_CHOICES = {0: "none", 1: "lone int8 rows", 2: "all"}


def prefetch() -> str:
    """Which decode steps of sessions made now prefetch in software (for benchmark tables and
    logs): "all" (the weights of every decode call and the attention's KV cache) on Intel CPUs,
    "lone int8 rows" (the weights of the AVX-512 tile's 1-row 8-bit calls, and the KV cache) on
    others;
    ``AUTOGLM_KERNELS_PREFETCH`` ``0`` makes it "none", ``1`` "all". Whatever it says, the AVX2
    tiles prefetch decode calls of 2-4 rows. "none" where the library does not run."""
    return PREFETCH_CHOICES.get(_ask("AutoglmKernelsPrefetch") or 0, "none")
