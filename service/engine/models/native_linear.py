"""Emit ``y = x @ W.T`` and the row lookup ``W[ids]`` for a :class:`NativeWeight` as ONNX nodes.

One ``MatMulNBits`` with the file's codes and scales; for formats with per-block minimums,
plus the exact extra product ``blocksum(x) @ mins.T`` added to its output: the block sums
(``Reshape`` + ``ReduceSum``, shared by the layers that read the same input), then a float
``MatMul`` of ``K / block_size`` rows.

The lookup is a ``GatherBlockQuantized`` over the same packed codes, so a tied embedding
table and lm_head share one copy of the file's bits (plus the gathered minimums, where the
format has them).
"""

from __future__ import annotations

import weakref
from typing import Any, Protocol

import numpy as np

from service.engine.models.native_quant import NativeWeight

MS_DOMAIN = "com.microsoft"


class GraphSink(Protocol):
    """What the builder's graph offers: add an initializer, add a node."""

    def init(self, name: str, array: np.ndarray) -> str: ...

    def node(
        self, op: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs: Any
    ) -> object: ...


def emit_native_linear(
    g: GraphSink,
    name: str,
    x: str,
    weight: NativeWeight,
    accuracy_level: int,
    float_type: type[np.floating[Any]] = np.float32,
    codes: str | None = None,
) -> str:
    """Add the nodes computing ``x @ weight.T`` for ``x`` [..., K] of ``float_type`` (the scales
    and minimums take that type too); return the output's name. ``codes``: the initializer
    already holding ``weight.packed()`` (a tied embedding's), else one is added."""
    out = f"{name}/out"
    main = f"{name}/nbits" if weight.mins is not None else out
    scales = weight.flat_scales().astype(float_type)
    if codes is None:
        codes = g.init(f"{name}.qweight", weight.packed())
    inputs = [x, codes, g.init(f"{name}.scales", scales)]
    g.node(
        "MatMulNBits", inputs, [main], domain=MS_DOMAIN, K=weight.k, N=weight.n, bits=weight.bits,
        block_size=weight.block_size, accuracy_level=accuracy_level,
    )  # fmt: skip
    if weight.mins is None:
        return out
    blocksum = _blocksum(g, x, weight.k, weight.block_size)
    mins = g.init(f"{name}.mins", weight.mins.T.astype(float_type))
    g.node("MatMul", [blocksum, mins], [f"{name}/min_term"])
    g.node("Add", [main, f"{name}/min_term"], [out])
    return out


def emit_native_lookup(
    g: GraphSink, name: str, ids: str, weight: NativeWeight, float_type: type[np.floating[Any]] = np.float32
) -> tuple[str, str]:
    """Add the nodes looking up rows ``ids`` [batch, seq] of ``weight`` (an embedding table
    [vocab, hidden]) as ``float_type`` [batch, seq, hidden]; return (output, the codes
    initializer, for a tied lm_head to share)."""
    codes = g.init(f"{name}.qweight", weight.packed())
    scales = g.init(f"{name}.row_scales", weight.scales[:, :, None].astype(float_type))
    inputs = [codes, ids, scales]
    blocks = f"{name}/blocks"
    g.node(
        "GatherBlockQuantized", inputs, [blocks], domain=MS_DOMAIN,
        gather_axis=0, quantize_axis=2, block_size=weight.block_size, bits=weight.bits,
    )  # fmt: skip
    if weight.mins is not None:
        mins = g.init(f"{name}.row_mins", weight.mins[:, :, None].astype(float_type))
        g.node("Gather", [mins, ids], [f"{name}/mins"])
        g.node("Add", [blocks, f"{name}/mins"], [f"{name}/blocks_min"])
        blocks = f"{name}/blocks_min"
    shape = g.init(f"{name}.shape", np.array([0, 0, weight.k], dtype=np.int64))
    g.node("Reshape", [blocks, shape], [f"{name}/out"])
    return f"{name}/out", codes


# Block sums already emitted per graph: (input, block size) -> output name. Layers that read the
# same input (gate and up) share one; each costs a node, and small nodes dominate at decode.
_BLOCKSUMS: weakref.WeakKeyDictionary[GraphSink, dict[tuple[str, int], str]] = weakref.WeakKeyDictionary()


def _blocksum(g: GraphSink, x: str, k: int, block_size: int) -> str:
    """Sums of ``x`` [batch, seq, K] over each block of ``block_size``: [batch, seq, K / block_size]."""
    emitted = _BLOCKSUMS.setdefault(g, {})
    key = (x, block_size)
    if key not in emitted:
        out = f"{x}/blocksum{block_size}"
        shape = g.init(f"{out}.shape", np.array([0, 0, k // block_size, block_size], dtype=np.int64))
        g.node("Reshape", [x, shape], [f"{out}/blocks"])
        axis = g.init(f"{out}.axis", np.array([-1], dtype=np.int64))
        g.node("ReduceSum", [f"{out}/blocks", axis], [out], keepdims=0)
        emitted[key] = out
    return emitted[key]
