"""A tiny model in each GGUF quantized type decodes natively as it does at fp32 from its dequantized weights.

At accuracy level 0 (fp32 compute) the native graph must give the same greedy tokens as the
fp32 graph built from ``gguf.quants.dequantize``'d weights, and logits equal to float rounding
(the native build keeps the embedding table in float32, as the fp32 build does). At level 4 (int8 compute, the
fast one) the inputs are quantized on the fly, so only the teacher-forced top-1 agreement is
measured and printed (``-s``); it is asserted only loosely, to catch a broken mapping.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from gguf import GGMLQuantizationType as T

from service.engine.models.gguf_source import GGUFSource
from service.engine.models.onnx_builder import Precision, build_decoder
from tests.engine.quant_model import LAYERS, Decoder, write_quant_gguf

TYPES = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)
PROMPT = [5, 17, 300, 42, 7, 99, 256, 3]
# Random models often settle into repeating one token, so every position of a varied sequence
# is compared too (teacher-forced).
VARIED = [int(t) for t in np.random.default_rng(11).integers(0, 512, 24)]
STEPS = 16
MIN_FAST_AGREEMENT = 0.75


def build_file(path: Path, precision: Precision, accuracy_level: int) -> Path:
    model_file = path.parent / f"{precision}-{accuracy_level}" / "model.onnx"
    if not model_file.exists():
        model_file.parent.mkdir()
        build_decoder(GGUFSource(path), model_file, precision=precision, accuracy_level=accuracy_level)
    return model_file


def build(path: Path, precision: Precision, accuracy_level: int) -> Decoder:
    return Decoder(build_file(path, precision, accuracy_level))


@pytest.fixture(scope="module", params=TYPES, ids=lambda t: t.name)
def quant_gguf(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    qtype: T = request.param
    return write_quant_gguf(tmp_path_factory.mktemp("quant") / f"tiny-{qtype.name}.gguf", qtype)


def test_native_graph_holds_every_linear_natively(quant_gguf: Path) -> None:
    model_file = build_file(quant_gguf, Precision.NATIVE, 0)
    graph = onnx.load(str(model_file), load_external_data=False).graph
    nbits = [node for node in graph.node if node.op_type == "MatMulNBits"]
    assert len(nbits) == LAYERS * 4 + 1  # qkv, o, gate+up, down per layer, and the tied lm_head
    float_matmuls = [node.output[0] for node in graph.node if node.op_type == "MatMul"]
    assert all("min_term" in out for out in float_matmuls)


@pytest.mark.parametrize("accuracy_level", [0, 1])
def test_native_greedy_tokens_match_fp32_of_the_dequantized_weights(
    quant_gguf: Path, accuracy_level: int
) -> None:
    fp32, native = build(quant_gguf, Precision.FP32, 0), build(quant_gguf, Precision.NATIVE, accuracy_level)
    assert native.greedy(PROMPT, STEPS) == fp32.greedy(PROMPT, STEPS)
    expected, got = fp32.logits(VARIED), native.logits(VARIED)
    np.testing.assert_array_equal(got.argmax(axis=-1), expected.argmax(axis=-1))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * float(np.abs(expected).max()))


def test_fast_accuracy_level_agreement(quant_gguf: Path) -> None:
    reference = build(quant_gguf, Precision.FP32, 0)
    sequence = PROMPT + reference.greedy(PROMPT, STEPS) + VARIED
    expected = reference.logits(sequence).argmax(axis=-1)
    fast = build(quant_gguf, Precision.NATIVE, 4).logits(sequence).argmax(axis=-1)
    agreement = float((fast == expected).mean())
    print(f"{quant_gguf.stem}: teacher-forced top-1 agreement at accuracy level 4: {agreement:.3f}")
    assert agreement >= MIN_FAST_AGREEMENT
