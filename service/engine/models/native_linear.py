"""Emit ``y = x @ W.T`` for a :class:`NativeWeight` as ONNX nodes.

One ``MatMulNBits`` with the file's codes and scales; for formats with per-block minimums,
plus the exact extra product ``blocksum(x) @ mins.T`` added to its output: the block sums
(``Reshape`` + ``ReduceSum``, shared by the layers that read the same input), then a float
``MatMul`` of ``K / block_size`` rows.
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
) -> str:
    """Add the nodes computing ``x @ weight.T`` for ``x`` [..., K] of ``float_type`` (the scales
    and minimums take that type too); return the output's name."""
    out = f"{name}/out"
    main = f"{name}/nbits" if weight.mins is not None else out
    scales = weight.flat_scales().astype(float_type)
    inputs = [x, g.init(f"{name}.qweight", weight.packed()), g.init(f"{name}.scales", scales)]
    zero_points = weight.zero_points()
    if zero_points is not None:
        inputs.append(g.init(f"{name}.qzeros", zero_points))
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
