"""Every architecture builds at every precision and runs; unsupported files fail in one line.

Whether the fp32 graphs compute what the reference computes is tests/fidelity/test_architectures.py;
here the quantized builds (int8, int4) are held to the fp32 build of the same file.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest

from service.cli.options import add_engine_arguments, engine_settings
from service.config import EngineSettings
from service.engine.loader import FALLBACK_CONTEXT, served_context
from service.engine.models.__main__ import main
from service.engine.models.gguf_source import GGUFSource
from service.engine.models.onnx_builder import MS_DOMAIN, Precision, build_decoder
from service.engine.models.registry import PreparedModel
from service.engine.runner import Runner
from service.errors import ModelError
from tests.engine.tiny_archs import TINY_ARCHS, QType, TinyArch, write_tiny_arch_gguf
from tests.engine.tiny_model import TINY_HEAD_DIM, TINY_KV_HEADS, TINY_LAYERS

MIN_INT8_AGREEMENT = 0.9
PROMPT = [int(i) for i in np.random.default_rng(3).integers(100, 40000, 48)]


@pytest.fixture(scope="module", params=list(TINY_ARCHS))
def source(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path
) -> GGUFSource:
    name = request.param
    path = tmp_path_factory.mktemp(name) / f"{name}.gguf"
    return GGUFSource(write_tiny_arch_gguf(path, smollm2_gguf, TINY_ARCHS[name], QType.Q8_0, QType.F16))


def _teacher_forced_top1(model_file: Path, ids: list[int]) -> np.ndarray:
    runner = Runner(model_file, device="cpu", threads=2, slots=1, max_len=len(ids))
    top1 = np.empty(len(ids), dtype=np.int64)
    for position, token in enumerate(ids):
        logits = runner.forward(0, np.array([[token]], dtype=np.int64), [position])
        assert np.isfinite(logits).all()
        top1[position] = int(np.argmax(logits[0]))
    return top1


def test_quantized_builds_follow_the_fp32_build(source: GGUFSource, tmp_path: Path) -> None:
    """int8 agrees with fp32 on >= 90 % of teacher-forced top-1 predictions; int4 runs (agreement
    printed); the float16 builds agree with their float32 twins as closely."""
    top1: dict[Precision, np.ndarray] = {}
    for precision in Precision:
        model_file = tmp_path / str(precision) / "model.onnx"
        model_file.parent.mkdir()
        build_decoder(source, model_file, precision=precision, max_positions=len(PROMPT))
        top1[precision] = _teacher_forced_top1(model_file, PROMPT)
    int8 = float(np.mean(top1[Precision.INT8] == top1[Precision.FP32]))
    int4 = float(np.mean(top1[Precision.INT4] == top1[Precision.FP32]))
    native = float(np.mean(top1[Precision.NATIVE] == top1[Precision.FP32]))
    # The CUDA builds, run here on the CPU provider: int8 and native in float16.
    fp16 = float(np.mean(top1[Precision.FP16] == top1[Precision.INT8]))
    native_fp16 = float(np.mean(top1[Precision.NATIVE_FP16] == top1[Precision.NATIVE]))
    arch = source.config.architecture
    print(
        f"\n{arch}: int8 {int8:.0%}, int4 {int4:.0%}, native {native:.0%} of fp32's top-1; "
        f"fp16 {fp16:.0%} of int8's, native-fp16 {native_fp16:.0%} of native's"
    )
    assert int8 >= MIN_INT8_AGREEMENT
    assert native >= MIN_INT8_AGREEMENT  # Q8_0 attention in its own bits, F16 MLP at int8
    assert fp16 >= MIN_INT8_AGREEMENT
    assert native_fp16 >= MIN_INT8_AGREEMENT


def test_native_build_in_fp32_is_the_file(source: GGUFSource, smollm2_gguf: Path, tmp_path: Path) -> None:
    """Every matrix Q8_0: the native build computed in fp32 (accuracy level 1) holds every linear
    layer in the file's own bits (fused q/k/v and gate/up included) and predicts as fp32 does."""
    spec = TINY_ARCHS[source.config.architecture]
    path = write_tiny_arch_gguf(tmp_path / "q8.gguf", smollm2_gguf, spec, QType.Q8_0, QType.Q8_0)
    q8 = GGUFSource(path)
    top1: dict[Precision, np.ndarray] = {}
    for precision, level in ((Precision.FP32, 0), (Precision.NATIVE, 1)):
        model_file = tmp_path / str(precision) / "model.onnx"
        model_file.parent.mkdir()
        build_decoder(q8, model_file, precision=precision, accuracy_level=level, max_positions=len(PROMPT))
        top1[precision] = _teacher_forced_top1(model_file, PROMPT)
    graph = onnx.load(str(tmp_path / "native" / "model.onnx"), load_external_data=False).graph
    assert all(node.domain == MS_DOMAIN for node in graph.node if "MatMul" in node.op_type)
    assert float(np.mean(top1[Precision.NATIVE] == top1[Precision.FP32])) >= 0.98


def test_build_reads_each_tensor_once_in_order(source: GGUFSource, tmp_path: Path) -> None:
    """Tensors are read one at a time, as listed (tied embeddings read again for the lm_head)."""
    seen: list[str] = []
    build_decoder(
        source, tmp_path / "model.onnx", precision=Precision.INT8, max_positions=64, on_tensor=seen.append
    )
    needed = source.needed_tensors()
    assert sorted(set(seen)) == sorted(needed)
    assert len(seen) == len(needed) + (1 if source.config.tie_word_embeddings else 0)


def test_gemma3_config_follows_llama_cpp(tmp_path: Path) -> None:
    """Five local layers to one global, the window from the file, a local rope base of 10000."""
    path = write_tiny_arch_gguf(tmp_path / "g.gguf", None, TINY_ARCHS["gemma3"], QType.F16, QType.F16)
    cfg = GGUFSource(path).config
    assert [cfg.is_local(i) for i in range(cfg.num_layers)] == [True] * 5 + [False]
    assert cfg.sliding_window == 8
    assert cfg.rope_local_theta == 10000.0
    assert cfg.attention_scale is None  # 1 / sqrt(head_dim), as llama.cpp for all but 27B


_SMALL = TinyArch("llama", hidden=256, head_dim=64)


@pytest.mark.parametrize(
    ("spec", "kwargs", "reason"),
    [
        (dataclasses.replace(_SMALL, arch="phi2"), {}, "GGUF architecture 'phi2' is not supported"),
        (_SMALL, {"attention_qtype": QType.Q8_K}, "quantization type Q8_K is not supported"),
        (
            dataclasses.replace(_SMALL, arch="qwen2", qkv_bias=True),
            {"skip": frozenset({"blk.1.attn_k.bias"})},
            "lacks tensors the qwen2 graph needs: blk.1.attn_k.bias",
        ),
        (
            _SMALL,
            {"extra_metadata": {"llama.rope.scaling.type": "yarn"}},
            "rope scaling 'yarn' is not supported",
        ),
    ],
    ids=["architecture", "quantization", "missing-tensor", "rope-scaling"],
)
def test_unsupported_file_fails_at_open_with_one_line(
    spec: TinyArch, kwargs: dict[str, object], reason: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """GGUFSource refuses it with a one-line reason, and the prepare command prints only that."""
    qtypes: dict[str, object] = {"attention_qtype": QType.F16, "mlp_qtype": QType.F16, **kwargs}
    path = write_tiny_arch_gguf(tmp_path / "bad.gguf", None, spec, **qtypes)  # type: ignore[arg-type]
    with pytest.raises(ModelError) as raised:
        GGUFSource(path)
    assert reason in str(raised.value)
    assert "\n" not in str(raised.value)
    assert main(["prepare", "--model", str(path), "--data-dir", str(tmp_path / "data"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert reason in err


def _prepared(context: int, kv_bytes_per_token: int) -> PreparedModel:
    return PreparedModel(
        "m", Path("."), Path("m.onnx"), "genai", context, kv_bytes_per_token=kv_bytes_per_token
    )


def test_served_context_is_capped_by_the_kv_budget() -> None:
    """A 128k model is served at what one chat's cache can hold in the budget; --max-context caps it."""
    llama3_8b = 32 * 2 * 8 * 128 * 4  # bytes per position: layers * (k, v) * kv heads * head_dim * fp32
    settings = EngineSettings(kv_budget_mb=2048)
    assert served_context(_prepared(131072, llama3_8b), settings) == 2048 * 2**20 // llama3_8b == 8192
    assert served_context(_prepared(2048, llama3_8b), settings) == 2048
    assert served_context(_prepared(131072, llama3_8b), EngineSettings(max_context=1000)) == 1000
    assert served_context(_prepared(512, llama3_8b), EngineSettings(max_context=1000)) == 512
    assert served_context(_prepared(131072, 0), settings) == FALLBACK_CONTEXT


def test_prepared_model_knows_its_kv_bytes_per_token(tiny_model: PreparedModel) -> None:
    assert tiny_model.kv_bytes_per_token == TINY_LAYERS * 2 * TINY_KV_HEADS * TINY_HEAD_DIM * 4


def test_max_context_flag_defaults_to_the_budget_cap() -> None:
    """--max-context absent: None (the model's context within the KV budget); given: that number."""
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    assert engine_settings(parser.parse_args([])).max_context is None
    assert engine_settings(parser.parse_args(["--max-context", "2048"])).max_context == 2048
    with pytest.raises(SystemExit):
        engine_settings(parser.parse_args(["--max-context", "0"]))
