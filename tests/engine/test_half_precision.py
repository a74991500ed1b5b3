"""The fp16 builds (the CUDA precisions) build, load and decode on the CPU provider.

ORT's CPU provider runs every op of the half graph (GroupQueryAttention, MatMulNBits,
SimplifiedLayerNormalization and its Skip form have float16 CPU kernels; for ops without one,
such as Sigmoid, the session inserts Casts itself). So the float16 graph is checked here against
the float32 graph of the same weights: teacher-forced top-1 agreement, measured and printed (-s),
and greedy tokens. Equality is not expected: float16 rounds activations and the KV cache.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from gguf import GGMLQuantizationType as T

from service.engine.models.gguf_source import GGUFSource
from service.engine.models.onnx_builder import Precision, build_decoder
from service.engine.models.prepare import prepare_gguf
from service.engine.models.registry import ModelSpec, PreparedModel, cache_dir_for, describe_dir
from service.engine.runner import Runner
from tests.engine.quant_model import VOCAB as QUANT_VOCAB
from tests.engine.quant_model import write_quant_gguf
from tests.engine.tiny_model import TINY_HEAD_DIM, TINY_KV_HEADS, TINY_LAYERS, write_tiny_gguf

VARIED = [int(t) for t in np.random.default_rng(5).integers(0, QUANT_VOCAB, 40)]
MIN_AGREEMENT = 0.9


@pytest.fixture(scope="module")
def builds(
    tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path, tiny_model: PreparedModel
) -> dict[str, Path]:
    """The tiny model at int8 (the shared fixture) and fp16 (the same file: same seed), and a
    Q4_K tiny model at native and native-fp16."""
    work = tmp_path_factory.mktemp("half")
    gguf_path = write_tiny_gguf(work / "tiny.gguf", smollm2_gguf)
    quant = write_quant_gguf(work / "tiny-q4k.gguf", T.Q4_K)
    made = {
        "int8": tiny_model.directory,
        "fp16": prepare_gguf(gguf_path, work / "fp16", precision=Precision.FP16, progress=False),
    }
    for p in (Precision.NATIVE, Precision.NATIVE_FP16):  # a file without a tokenizer: the graph only
        (work / f"q4k-{p}").mkdir()
        build_decoder(GGUFSource(quant), work / f"q4k-{p}" / "model.onnx", precision=p, accuracy_level=0)
        made[f"q4k-{p}"] = work / f"q4k-{p}"
    return made


def _runner(directory: Path, **kwargs: object) -> Runner:
    return Runner(directory / "model.onnx", device="cpu", threads=1, slots=2, max_len=64, **kwargs)  # type: ignore[arg-type]


def teacher_forced_top1(runner: Runner, ids: list[int]) -> np.ndarray:
    """The top-1 token after each prefix of ``ids``, one token per step (decode)."""
    return np.array([int(runner.forward(0, np.array([[t]]), [i])[0].argmax()) for i, t in enumerate(ids)])


def test_fp16_graph_is_float16_throughout(builds: dict[str, Path]) -> None:
    graph = onnx.load(str(builds["fp16"] / "model.onnx"), load_external_data=False).graph
    f16 = onnx.TensorProto.FLOAT16
    assert graph.output[0].name == "logits"
    assert graph.output[0].type.tensor_type.elem_type == f16
    kv = [v for v in graph.input if v.name.startswith("past_key_values.")]
    assert len(kv) == 2 * TINY_LAYERS
    assert all(v.type.tensor_type.elem_type == f16 for v in kv)
    floats = [t for t in graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, f16)]
    assert floats
    assert all(t.data_type == f16 for t in floats), "a float32 initializer is left"
    assert not [n for n in graph.node if n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.FLOAT]
    scales = [t for t in graph.initializer if t.name.endswith(".scales")]
    assert scales
    assert all(t.data_type == f16 for t in scales)
    # The prepared directory reports half the float32 KV bytes per position.
    assert (
        describe_dir("t", builds["fp16"]).kv_bytes_per_token
        == TINY_LAYERS * 2 * TINY_KV_HEADS * TINY_HEAD_DIM * 2
    )


@pytest.mark.parametrize(("half", "full"), [("fp16", "int8"), ("q4k-native-fp16", "q4k-native")])
def test_half_build_agrees_with_the_float32_build(builds: dict[str, Path], half: str, full: str) -> None:
    runner_half, runner_full = _runner(builds[half]), _runner(builds[full])
    assert runner_half.dtype is np.float16
    assert runner_full.dtype is np.float32
    assert runner_half.shape.kv_bytes_per_token * 2 == runner_full.shape.kv_bytes_per_token
    got, expected = teacher_forced_top1(runner_half, VARIED), teacher_forced_top1(runner_full, VARIED)
    agreement = float((got == expected).mean())
    print(
        f"{half} against {full}: teacher-forced top-1 agreement {agreement:.3f} over {len(VARIED)} positions"
    )
    assert agreement >= MIN_AGREEMENT
    logits = runner_half.forward(1, np.array([VARIED[:8]]), [0])
    assert logits.dtype == np.float32
    assert np.isfinite(logits).all()


def test_cache_directory_names_the_build(tmp_path: Path) -> None:
    spec = ModelSpec("smollm2-135m-instruct", "default", "")
    names = {p: cache_dir_for(spec, tmp_path, p).name for p in Precision}
    assert len(set(names.values())) == len(Precision)
    assert "-fp16-" in names[Precision.FP16]
    assert "-native-fp16-" in names[Precision.NATIVE_FP16]
