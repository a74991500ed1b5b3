"""Each model's default sampling: from the GGUF's general.sampling.* keys, else its family's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import pytest

from service.engine.models.registry import PreparedModel, describe_dir
from service.engine.models.sampling_defaults import (
    FAMILY_DEFAULTS,
    GENERIC,
    SamplingDefaults,
    for_family,
    from_gguf,
)
from service.engine.types import SamplingParams


def _gguf_with(path: Path, metadata: dict[str, str | float | int]) -> Path:
    """A GGUF file holding only ``metadata`` (no tensors): all that the defaults read."""
    writer = gguf.GGUFWriter(path, "llama")
    for key, value in metadata.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_float32(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_gguf_sampling_keys_win_field_by_field(tmp_path: Path) -> None:
    path = _gguf_with(
        tmp_path / "m.gguf",
        {
            gguf.Keys.General.BASENAME: "SmolLM2",
            gguf.Keys.General.SAMPLING_TEMP: 0.6,
            gguf.Keys.General.SAMPLING_TOP_K: 20,
        },
    )
    defaults = from_gguf(path)
    family = FAMILY_DEFAULTS["smollm2"]
    assert defaults == SamplingDefaults(
        temperature=pytest.approx(0.6),  # type: ignore[arg-type]
        top_p=family.top_p,
        top_k=20,
        repetition_penalty=family.repetition_penalty,
        source="gguf",
    )


def test_without_sampling_keys_the_family_then_the_generic_defaults_apply(tmp_path: Path) -> None:
    smol = _gguf_with(tmp_path / "smol.gguf", {gguf.Keys.General.NAME: "SmolLM2 360M Instruct"})
    assert from_gguf(smol) == FAMILY_DEFAULTS["smollm2"]
    other = _gguf_with(tmp_path / "other.gguf", {gguf.Keys.General.NAME: "Some Llama"})
    assert from_gguf(other) == GENERIC
    assert for_family(None, "smollm2-135m-instruct-int8-v1") == FAMILY_DEFAULTS["smollm2"]
    assert for_family("tiny") == GENERIC


def test_generic_defaults_are_the_engines_own() -> None:
    engine = SamplingParams()
    assert GENERIC.params() == {
        "temperature": engine.temperature,
        "top_p": engine.top_p,
        "top_k": engine.top_k,
        "repetition_penalty": engine.repetition_penalty,
    }
    for defaults in FAMILY_DEFAULTS.values():
        SamplingParams(**defaults.params()).validate()


def test_preparation_records_the_defaults_and_a_start_reads_them(
    tmp_path: Path, tiny_model: PreparedModel
) -> None:
    """The manifest of a prepared GGUF holds its defaults (the tiny model's name is no known
    family: generic); what the manifest says is what the model gets, with no GGUF read at start."""
    manifest_path = tiny_model.directory / "localchat.json"
    manifest = json.loads(manifest_path.read_text())
    assert SamplingDefaults.from_json(manifest["sampling"]) == GENERIC
    assert tiny_model.sampling == GENERIC

    copy = tmp_path / "model"
    shutil.copytree(tiny_model.directory, copy)
    recorded = SamplingDefaults(temperature=0.4, top_k=40, repetition_penalty=1.1, source="gguf")
    manifest["sampling"] = recorded.to_json()
    (copy / "localchat.json").write_text(json.dumps(manifest))
    assert describe_dir("any-name", copy).sampling == recorded

    del manifest["sampling"]  # prepared by an older version: the family, by the model's id
    (copy / "localchat.json").write_text(json.dumps(manifest))
    assert describe_dir("smollm2-135m-instruct", copy).sampling == FAMILY_DEFAULTS["smollm2"]


@pytest.mark.slow
def test_the_default_model_gets_its_measured_defaults(default_model: PreparedModel) -> None:
    assert default_model.sampling == FAMILY_DEFAULTS["smollm2"]
    assert default_model.sampling.params() == {
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": 0,
        "repetition_penalty": 1.2,
    }
