"""Preparing GGUF models into cached ONNX directories, and resolving what the user named."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from service.engine.models import registry
from service.engine.models.__main__ import main
from service.engine.models.onnx_builder import Precision
from service.engine.models.prepare import BUILDER_VERSION, prepare_gguf
from service.engine.models.registry import ModelSpec, cache_dir_for, parse_model_arg, resolve
from service.errors import ModelError
from service.paths import default_data_dir
from tests.conftest import CACHE_DIR
from tests.engine.tiny_model import TINY_CONTEXT, TINY_HEAD_DIM, TINY_KV_HEADS, TINY_LAYERS, write_tiny_gguf

MODEL_FILES = {"model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json"}
MODEL_FILES |= {"genai_config.json", "generation_config.json", "localchat.json"}


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", smollm2_gguf)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def tiny_prepared(tiny_gguf: Path, data_dir: Path) -> registry.PreparedModel:
    return resolve(parse_model_arg(str(tiny_gguf)), data_dir, precision=Precision.INT8, progress=False)


def _one_step(model_file: Path, layers: int, kv_heads: int, head_dim: int) -> list[np.ndarray]:
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    feeds = {
        "input_ids": np.array([[1, 28, 905]], dtype=np.int64),
        "attention_mask": np.ones((1, 3), dtype=np.int64),
    }
    for i in range(layers):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, kv_heads, 0, head_dim), dtype=np.float32)
    return list(session.run(None, feeds))


def test_prepare_writes_a_complete_directory(tiny_prepared: registry.PreparedModel) -> None:
    directory = tiny_prepared.directory
    assert {p.name for p in directory.iterdir()} == MODEL_FILES
    assert tiny_prepared.style == "genai"
    assert tiny_prepared.context_length == TINY_CONTEXT
    assert tiny_prepared.model_file == directory / "model.onnx"
    manifest = json.loads((directory / "localchat.json").read_text())
    assert manifest["format_version"] == 1
    assert manifest["builder_version"] == BUILDER_VERSION
    assert manifest["precision"] == "int8"
    assert manifest["accuracy_level"] == 4
    assert manifest["source"]["file"] == "tiny.gguf"
    assert len(manifest["source"]["sha256"]) == 64
    assert manifest["config"]["num_layers"] == TINY_LAYERS
    genai = json.loads((directory / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["filename"] == "model.onnx"
    assert genai["model"]["decoder"]["num_key_value_heads"] == TINY_KV_HEADS
    assert genai["model"]["context_length"] == genai["search"]["max_length"] == TINY_CONTEXT
    assert (genai["model"]["bos_token_id"], genai["model"]["eos_token_id"]) == (1, 2)


def test_prepared_graph_runs_one_step(tiny_prepared: registry.PreparedModel) -> None:
    logits, *present = _one_step(tiny_prepared.model_file, TINY_LAYERS, TINY_KV_HEADS, TINY_HEAD_DIM)
    assert logits.shape == (1, 1, 49152)
    assert np.isfinite(logits).all()
    assert present[0].shape == (1, TINY_KV_HEADS, 3, TINY_HEAD_DIM)


def test_second_resolve_hits_the_cache(
    tiny_prepared: registry.PreparedModel, tiny_gguf: Path, data_dir: Path
) -> None:
    mtime = tiny_prepared.model_file.stat().st_mtime_ns
    started = time.perf_counter()
    again = resolve(parse_model_arg(str(tiny_gguf)), data_dir, precision=Precision.INT8, progress=False)
    assert time.perf_counter() - started < 1.0
    assert again == tiny_prepared
    assert again.model_file.stat().st_mtime_ns == mtime


def test_cli_prints_the_prepared_directory(
    tiny_prepared: registry.PreparedModel, tiny_gguf: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["prepare", "--model", str(tiny_gguf), "--data-dir", str(data_dir), "--precision", "int8"]
    assert main([*args, "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(tiny_prepared.directory)


def test_cli_builds_native_by_default(
    tiny_gguf: Path, data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """On the CPU, ``--precision auto`` (the default) is the file's own bits."""
    assert main(["prepare", "--model", str(tiny_gguf), "--data-dir", str(data_dir), "--quiet"]) == 0
    directory = Path(capsys.readouterr().out.strip())
    assert "-native-v" in directory.name
    manifest = json.loads((directory / "localchat.json").read_text())
    assert (manifest["precision"], manifest["accuracy_level"]) == ("native", 4)
    graph = onnx.load(str(directory / "model.onnx"), load_external_data=False).graph
    assert any(node.op_type == "MatMulNBits" for node in graph.node)


def test_cli_reports_model_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["prepare", "--model", str(tmp_path / "absent.gguf"), "--data-dir", str(tmp_path)])
    assert code == 1
    assert "GGUF file not found" in capsys.readouterr().err


def test_interrupted_build_leaves_nothing_behind(tiny_gguf: Path, tmp_path: Path) -> None:
    seen: list[str] = []

    def interrupt(name: str) -> None:
        seen.append(name)
        if len(seen) == 3:
            raise KeyboardInterrupt

    out = tmp_path / "models" / "tiny"
    with pytest.raises(KeyboardInterrupt):
        prepare_gguf(tiny_gguf, out, precision=Precision.INT8, progress=False, on_tensor=interrupt)
    assert not out.exists()
    assert list(out.parent.iterdir()) == []


def test_cache_key_follows_precision_and_builder_version(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for spec in (parse_model_arg("default"), parse_model_arg(str(tiny_gguf))):
        int8 = cache_dir_for(spec, tmp_path, Precision.INT8)
        assert cache_dir_for(spec, tmp_path, Precision.INT8) == int8
        assert cache_dir_for(spec, tmp_path, Precision.INT4) != int8
        monkeypatch.setattr(registry, "BUILDER_VERSION", BUILDER_VERSION + 1)
        assert cache_dir_for(spec, tmp_path, Precision.INT8) != int8
        monkeypatch.undo()


def test_gguf_cache_key_changes_when_the_file_changes(tiny_gguf: Path, tmp_path: Path) -> None:
    copy = shutil.copy(tiny_gguf, tmp_path / "tiny.gguf")
    spec = parse_model_arg(str(copy))
    before = cache_dir_for(spec, tmp_path, Precision.INT8)
    with Path(copy).open("ab") as fh:
        fh.write(b"\0")
    assert cache_dir_for(spec, tmp_path, Precision.INT8) != before


def test_onnx_dir_without_tokenizer_is_rejected(
    tiny_prepared: registry.PreparedModel, tmp_path: Path
) -> None:
    shutil.copy(tiny_prepared.model_file, tmp_path / "model.onnx")
    with pytest.raises(ModelError, match=r"lacks tokenizer\.json"):
        resolve(parse_model_arg(str(tmp_path)), tmp_path, precision=Precision.INT8, progress=False)


def test_onnx_dir_without_graph_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ModelError, match=r"lacks an \.onnx model file$"):
        resolve(parse_model_arg(str(tmp_path)), tmp_path, precision=Precision.INT8, progress=False)


def test_onnx_dir_reuses_a_prepared_directory(tiny_prepared: registry.PreparedModel, data_dir: Path) -> None:
    spec = parse_model_arg(str(tiny_prepared.directory))
    assert spec.kind == "onnx_dir"
    found = resolve(spec, data_dir, precision=Precision.FP32, progress=False)
    assert (found.style, found.context_length, found.model_file) == (
        "genai",
        TINY_CONTEXT,
        tiny_prepared.model_file,
    )


def test_optimum_style_is_detected_from_position_ids(tmp_path: Path) -> None:
    names = ["input_ids", "attention_mask", "position_ids"]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["b", "s"]) for n in names]
    inputs.append(
        helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, ["b", 1, "p", 16])
    )
    output = helper.make_tensor_value_info("logits", TensorProto.INT64, ["b", "s"])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input_ids"], ["logits"])], "g", inputs, [output]
    )
    onnx.save(helper.make_model(graph), str(tmp_path / "model.onnx"))
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 4096}))
    found = registry.describe_dir("some/model", tmp_path)
    assert (found.style, found.context_length) == ("optimum", 4096)


def test_hub_export_without_optimum_explains_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "optimum", None)  # makes `import optimum...` raise ImportError
    with pytest.raises(ModelError, match=r"pip install '\.\[export\]'"):
        resolve(
            parse_model_arg("HuggingFaceTB/SmolLM2-360M-Instruct"),
            tmp_path,
            precision=Precision.FP32,
            progress=False,
        )
    assert not (tmp_path / "models" / "hub").exists() or not any((tmp_path / "models" / "hub").iterdir())


def test_parse_model_arg(tiny_gguf: Path, tmp_path: Path) -> None:
    default = ModelSpec("smollm2-135m-instruct", "default", "")
    assert parse_model_arg("default") == default
    assert parse_model_arg("SmolLM2-135M-Instruct") == default
    assert parse_model_arg(str(tiny_gguf)) == ModelSpec("tiny", "gguf", str(tiny_gguf.resolve()))
    assert parse_model_arg(str(tmp_path)) == ModelSpec(tmp_path.name, "onnx_dir", str(tmp_path.resolve()))
    assert parse_model_arg("HuggingFaceTB/SmolLM2-360M-Instruct") == ModelSpec(
        "HuggingFaceTB/SmolLM2-360M-Instruct", "hub", "HuggingFaceTB/SmolLM2-360M-Instruct"
    )
    with pytest.raises(ModelError, match="GGUF file not found"):
        parse_model_arg(str(tmp_path / "missing.gguf"))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelError, match=r"neither a \.gguf file nor a model directory"):
        parse_model_arg(str(tmp_path / "notes.txt"))
    with pytest.raises(ModelError, match="unknown model"):
        parse_model_arg("no such model")


def test_default_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LOCALCHAT_DATA_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "explicit"
    monkeypatch.delenv("LOCALCHAT_DATA_DIR")
    assert default_data_dir() == tmp_path / "xdg" / "localchat"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert default_data_dir() == tmp_path / ".local" / "share" / "localchat"
    monkeypatch.setattr("os.geteuid", lambda: 0)
    assert default_data_dir() == Path("/var/lib/localchat")


@pytest.mark.slow
def test_default_model_prepares_once_and_runs(smollm2_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "fetch_default_gguf", lambda _downloads: smollm2_gguf)
    data = CACHE_DIR  # the same data dir as tests/engine/conftest.py's default_model: built once
    prepared = resolve(parse_model_arg("default"), data, precision=Precision.INT8, progress=False)
    assert prepared.directory == data / "models" / f"smollm2-135m-instruct-int8-v{BUILDER_VERSION}"
    assert (prepared.style, prepared.context_length) == ("genai", 8192)
    started = time.perf_counter()
    again = resolve(parse_model_arg("default"), data, precision=Precision.INT8, progress=False)
    assert time.perf_counter() - started < 1.0
    assert again == prepared
    logits, *_ = _one_step(prepared.model_file, layers=30, kv_heads=3, head_dim=64)
    assert logits.shape == (1, 1, 49152)
    assert np.isfinite(logits).all()
