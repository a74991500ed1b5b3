"""GGUF quantized tensors through our MatMulNBits mapping give the product of their dequantized values."""

from __future__ import annotations

from typing import Any

import gguf
import numpy as np
import onnxruntime as ort
import pytest
from gguf import GGMLQuantizationType as T
from onnx import TensorProto, helper, numpy_helper

from service.engine.models.native_linear import MS_DOMAIN, emit_native_linear, emit_native_lookup
from service.engine.models.native_quant import LAYOUTS, NativeWeight, concat_rows, from_gguf

N, K = 24, 512
QUANTIZABLE = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)  # gguf.quants.quantize supports these
K_QUANTS = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)  # hand-built blocks of random bytes
# Byte ranges of each K-quant block that hold f16 scales (random bytes there could be NaN/inf).
F16_FIELDS = {T.Q2_K: (80, 84), T.Q3_K: (108, 110), T.Q4_K: (0, 4), T.Q5_K: (0, 4), T.Q6_K: (208, 210)}


class _Graph:
    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []

    def init(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs: Any) -> None:
        self.nodes.append(helper.make_node(op, inputs, outputs, domain=domain, **attrs))


def run_native(weight: NativeWeight, x: np.ndarray, accuracy_level: int) -> np.ndarray:
    g = _Graph()
    out = emit_native_linear(g, "w", "x", weight, accuracy_level)
    graph = helper.make_graph(
        g.nodes, "native", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", weight.k])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], g.initializers,
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid(MS_DOMAIN, 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


def raw_tensor(qtype: T, seed: int) -> np.ndarray:
    """A [N, bytes] tensor of ``qtype`` as GGUFReader gives it."""
    rng = np.random.default_rng(seed)
    if qtype in QUANTIZABLE:
        weights = rng.standard_normal((N, K)).astype(np.float32) * 0.05
        weights[0, :32] = 0.0  # an all-zero block (scale 0)
        return np.asarray(gguf.quants.quantize(weights, qtype))
    block_elems, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (N * K // block_elems, type_size), dtype=np.uint8)
    lo, hi = F16_FIELDS[qtype]
    scales = (rng.uniform(-0.01, 0.01, (blocks.shape[0], (hi - lo) // 2))).astype(np.float16)
    blocks[:, lo:hi] = scales.view(np.uint8)
    return blocks.reshape(N, -1)


@pytest.mark.parametrize("qtype", QUANTIZABLE + K_QUANTS, ids=lambda t: t.name)
def test_mapping_holds_the_dequantized_values(qtype: T) -> None:
    raw = raw_tensor(qtype, seed=1)
    expected = np.asarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32)
    weight = from_gguf(raw, qtype, K)
    assert (weight.bits, weight.block_size, weight.mins is not None) == LAYOUTS[qtype]
    np.testing.assert_array_equal(weight.dequantize(), expected)


@pytest.mark.parametrize("accuracy_level", [0, 1])
@pytest.mark.parametrize("qtype", QUANTIZABLE + K_QUANTS, ids=lambda t: t.name)
def test_matmulnbits_gives_the_dequantized_product(qtype: T, accuracy_level: int) -> None:
    raw = raw_tensor(qtype, seed=2)
    dequantized = np.asarray(gguf.quants.dequantize(raw, qtype), dtype=np.float64)
    x = np.random.default_rng(3).standard_normal((2, 3, K)).astype(np.float32)
    got = run_native(from_gguf(raw, qtype, K), x, accuracy_level)
    expected = x.astype(np.float64) @ dequantized.T
    scale = np.abs(x).astype(np.float64) @ np.abs(dequantized).T  # bound of the summation's rounding
    assert got.shape == (2, 3, N)
    assert np.all(np.abs(got - expected) <= 1e-5 * scale + 1e-30)


@pytest.mark.parametrize("qtype", QUANTIZABLE + K_QUANTS, ids=lambda t: t.name)
def test_lookup_gives_the_dequantized_rows_and_shares_its_codes_with_the_tied_product(qtype: T) -> None:
    """A tied table: GatherBlockQuantized rows equal the dequantized ones (to the rounding of the
    centred minimum's one addition), and the
    lm_head's MatMulNBits reads the same codes initializer (one copy of the file's bits)."""
    raw = raw_tensor(qtype, seed=10)
    dequantized = np.asarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32)
    table = from_gguf(raw, qtype, K)
    g = _Graph()
    rows, codes = emit_native_lookup(g, "table", "ids", table)
    logits = emit_native_linear(g, "head", rows, table, 1, codes=codes)
    graph = helper.make_graph(
        g.nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in (rows, logits)],
        g.initializers,
    )  # fmt: skip
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS_DOMAIN, 1)]
    )
    model.ir_version = 10
    assert sum(init.data_type == TensorProto.UINT8 and init.name == codes for init in g.initializers) == 1
    assert not any(init.name.startswith("head.qweight") for init in g.initializers)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([[0, N - 1, 5], [7, 7, 1]], dtype=np.int64)
    got_rows, got_logits = session.run(None, {"ids": ids})
    np.testing.assert_allclose(
        got_rows, dequantized[ids], rtol=1e-6, atol=1e-7 * float(np.abs(dequantized).max())
    )
    expected = dequantized[ids].astype(np.float64) @ dequantized.T.astype(np.float64)
    scale = np.abs(dequantized[ids]).astype(np.float64) @ np.abs(dequantized.T).astype(np.float64)
    assert np.all(np.abs(got_logits - expected) <= 1e-5 * scale + 1e-30)


def test_mixed_types_concatenate_exactly() -> None:
    """Packed QKV from Q4_K, Q4_0 and Q6_K rows (as Q4_K_M files mix them) keeps every value."""
    parts = [(T.Q4_K, 4), (T.Q4_0, 5), (T.Q6_K, 6)]
    raws = [raw_tensor(qtype, seed) for qtype, seed in parts]
    pairs = list(zip(raws, (qtype for qtype, _ in parts), strict=True))
    stacked = concat_rows([from_gguf(raw, qtype, K) for raw, qtype in pairs])
    expected = np.concatenate([gguf.quants.dequantize(raw, qtype) for raw, qtype in pairs])
    assert (stacked.bits, stacked.block_size) == (8, 16)
    np.testing.assert_array_equal(stacked.dequantize(), expected)
    x = np.random.default_rng(7).standard_normal((1, 2, K)).astype(np.float32)
    got = run_native(stacked, x, 0)
    scale = np.abs(x).astype(np.float64) @ np.abs(expected.astype(np.float64)).T
    assert np.all(np.abs(got - x.astype(np.float64) @ expected.T) <= 1e-5 * scale + 1e-30)


def test_4bit_layouts_with_and_without_minimums_stack_at_4_bits() -> None:
    """Centred codes share the default zero point, so Q4_0 and Q4_1 rows stack without widening."""
    a, b = from_gguf(raw_tensor(T.Q4_0, 8), T.Q4_0, K), from_gguf(raw_tensor(T.Q4_1, 9), T.Q4_1, K)
    stacked = concat_rows([a, b])
    assert (stacked.bits, stacked.zero_point) == (4, 8)
    np.testing.assert_array_equal(stacked.dequantize(), np.concatenate([a.dequantize(), b.dequantize()]))


def test_unmapped_type_is_refused() -> None:
    with pytest.raises(ValueError, match="no native MatMulNBits mapping"):
        from_gguf(np.zeros((N, K * 2), dtype=np.uint8), T.F16, K)
