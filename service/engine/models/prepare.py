"""Turn a GGUF file into a model directory our runner (and onnxruntime-genai) can load.

The directory is built under a temporary sibling name and renamed into place at the end,
and ``localchat.json`` is written last: a directory that exists with a manifest is
complete, so a crash or interrupt mid-build never leaves a half model that loads later.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from service.engine.models import sampling_defaults
from service.engine.models.gguf_source import GGUFSource
from service.engine.models.gguf_tokenizer import GGUFTokenizerSpec, read_gguf_tokenizer, write_tokenizer_dir
from service.engine.models.onnx_builder import Precision, build_decoder
from service.errors import ModelError

if TYPE_CHECKING:
    from collections.abc import Callable

# Bump whenever the graph, tokenizer files or configs we write change: it is part of every
# cache key, so old prepared directories are rebuilt rather than reused.
BUILDER_VERSION = 3
MANIFEST_NAME = "localchat.json"
MANIFEST_FORMAT = 1
MODEL_FILE = "model.onnx"
GENAI_CONFIG_NAME = "genai_config.json"

# int8 MatMulNBits is ~60x slower per token without accuracy_level 4 (int8 compute);
# int4 is fast on the fp32 path (level 0) and more accurate there. Native: 8-bit layouts
# need level 4 as int8 does, and 4-bit ones run ~2.5x faster there than at level 0/1
# (bench/native.py), at the cost of quantizing the activations per block.
# The half builds are for CUDA, whose MatMulNBits ignores the level; on the CPU, level 4 (int8
# compute) is what keeps their 8-bit weights fast there too.
ACCURACY_LEVELS = {
    Precision.NATIVE: 4,
    Precision.INT8: 4,
    Precision.INT4: 0,
    Precision.FP32: 0,
    Precision.FP16: 4,
    Precision.NATIVE_FP16: 4,
}

_PARTIAL_MARK = ".partial-"
_STALE_PARTIAL_S = 6 * 3600


def prepare_gguf(
    gguf_path: Path,
    out_dir: Path,
    *,
    precision: Precision,
    progress: bool = True,
    max_positions: int | None = None,
    on_tensor: Callable[[str], None] | None = None,
    accuracy_level: int | None = None,
) -> Path:
    """Build ``out_dir`` from ``gguf_path`` and return it.

    ``accuracy_level`` overrides MatMulNBits' compute precision (default: the precision's own,
    ``ACCURACY_LEVELS``); fidelity checks use 1 to compute natively in fp32.

    ``on_tensor`` is called with each tensor's name as it is read; an exception it raises
    aborts the build and leaves ``out_dir`` untouched.
    """
    started = time.perf_counter()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out_dir)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}{_PARTIAL_MARK}", dir=out_dir.parent))
    try:
        level = ACCURACY_LEVELS[precision] if accuracy_level is None else accuracy_level
        _build_into(work, gguf_path, precision, level, progress, max_positions, on_tensor)
        _move_into_place(work, out_dir)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    if progress:
        elapsed = time.perf_counter() - started
        print(f"prepared {out_dir} ({precision}) in {elapsed:.1f} s", file=sys.stderr)
    return out_dir


def read_manifest(model_dir: Path) -> dict[str, Any] | None:
    """The manifest of a complete prepared directory, or None when there is none."""
    try:
        text = (model_dir / MANIFEST_NAME).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise ModelError(f"{model_dir / MANIFEST_NAME} is corrupt; delete {model_dir} to rebuild it")
    return data


def _build_into(
    work: Path,
    gguf_path: Path,
    precision: Precision,
    accuracy_level: int,
    progress: bool,
    max_positions: int | None,
    on_tensor: Callable[[str], None] | None,
) -> None:
    source = GGUFSource(gguf_path)
    config = source.config
    # The tokenizer first: a file whose vocabulary cannot be converted fails before the long part.
    try:
        spec = read_gguf_tokenizer(gguf_path)
        write_tokenizer_dir(spec, work)
    except (NotImplementedError, ValueError) as exc:
        raise ModelError(f"cannot convert the tokenizer of {gguf_path}: {exc}") from exc
    context_length = max_positions or config.context_length
    with tqdm(
        total=source.tensor_count(),
        desc=f"reading {gguf_path.name}",
        unit="tensor",
        file=sys.stderr,
        disable=not progress,
        leave=False,
    ) as bar:

        def step(name: str) -> None:
            if on_tensor is not None:
                on_tensor(name)
            bar.update(1)

        build_decoder(
            source,
            work / MODEL_FILE,
            precision=precision,
            accuracy_level=accuracy_level,
            max_positions=context_length,
            on_tensor=step,
        )
    genai = genai_config(source, spec, context_length)
    _write_json(work / GENAI_CONFIG_NAME, genai)
    manifest = {
        "format_version": MANIFEST_FORMAT,
        "builder_version": BUILDER_VERSION,
        "source": {"file": gguf_path.name, "size": gguf_path.stat().st_size, "sha256": _sha256(gguf_path)},
        "precision": str(precision),
        "accuracy_level": accuracy_level,
        "config": config.to_json(),
        "context_length": context_length,
        "sampling": sampling_defaults.from_reader(source.reader).to_json(),
    }
    _write_json(work / MANIFEST_NAME, manifest)  # last: its presence marks a complete build


def genai_config(source: GGUFSource, spec: GGUFTokenizerSpec, context_length: int) -> dict[str, Any]:
    """The ``genai_config.json`` onnxruntime-genai's ``og.Model`` needs for our graph."""
    cfg = source.config
    eos = spec.eos_id
    return {
        "model": {
            "bos_token_id": spec.bos_id,
            "context_length": context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL_FILE,
                "head_size": cfg.head_dim,
                "hidden_size": cfg.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": cfg.num_heads,
                "num_hidden_layers": cfg.num_layers,
                "num_key_value_heads": cfg.num_kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": spec.pad_id if spec.pad_id is not None else eos,
            "type": source.architecture.genai_type,
            "vocab_size": cfg.vocab_size,
        },
        "search": {
            "do_sample": False,
            "max_length": context_length,
            "num_beams": 1,
            "past_present_share_buffer": True,
            "top_k": 1,
            "top_p": 1.0,
            "temperature": 1.0,
            "repetition_penalty": 1.0,
            "min_length": 0,
            "num_return_sequences": 1,
            "early_stopping": True,
            "length_penalty": 1.0,
            "diversity_penalty": 0.0,
            "no_repeat_ngram_size": 0,
        },
    }


def _move_into_place(work: Path, out_dir: Path) -> None:
    if out_dir.exists():
        if (out_dir / MANIFEST_NAME).is_file():
            return  # another process finished the same build first; keep its copy
        shutil.rmtree(out_dir)  # incomplete leftovers of an older, non-atomic build
    work.rename(out_dir)


def _remove_stale_partials(out_dir: Path) -> None:
    """Delete temporary build dirs of ``out_dir`` left by a killed process long ago."""
    cutoff = time.time() - _STALE_PARTIAL_S
    for leftover in out_dir.parent.glob(f".{out_dir.name}{_PARTIAL_MARK}*"):
        try:
            if leftover.stat().st_mtime < cutoff:
                shutil.rmtree(leftover, ignore_errors=True)
        except FileNotFoundError:
            continue


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
