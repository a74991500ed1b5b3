"""Read a GGUF file: its model configuration, and its weights one tensor at a time.

The file is memory-mapped (``gguf.GGUFReader``); a tensor is dequantized to float32 only when
asked for, so converting a multi-GB file never holds more than one float32 tensor of it.

Everything that makes a file unusable (architecture, quantization type, missing tensors,
rope variant) is found when the source is opened, before any work, and reported as one
``ModelError`` line.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np

from service.engine.models.architectures import ARCHITECTURES, Architecture
from service.engine.models.native_quant import NATIVE_TYPES, NativeWeight, from_gguf
from service.errors import ModelError

if TYPE_CHECKING:
    from pathlib import Path

_ROWS_PER_CHUNK = 4096  # dequantize big tensors in slices: bounded temporaries
_FLOAT_TYPES = frozenset({gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16})


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The hyperparameters the graph needs, read from GGUF metadata (llama.cpp's keys)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    context_length: int
    tie_word_embeddings: bool
    rope_linear_factor: float = 1.0  # positions divided by this (global layers only)
    rope_local_theta: float | None = None  # rope base of sliding-window layers
    sliding_window: int = 0  # keys a local layer's query sees, itself included (0: none)
    sliding_window_pattern: int = 0
    attention_scale: float | None = None  # None: 1 / sqrt(head_dim)
    has_rope_freqs: bool = False  # a ``rope_freqs.weight`` tensor divides the frequencies

    def is_local(self, layer: int) -> bool:
        """Whether ``layer`` uses sliding-window attention."""
        pattern = self.sliding_window_pattern
        return self.sliding_window > 0 and pattern > 0 and (layer + 1) % pattern != 0

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise ModelError(f"GGUF metadata lacks {key!r}")
        return default
    return field.contents()


def architecture_of(reader: gguf.GGUFReader) -> Architecture:
    arch = str(_field(reader, "general.architecture"))
    found = ARCHITECTURES.get(arch)
    if found is None:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise ModelError(f"GGUF architecture {arch!r} is not supported (supported: {supported})")
    return found


def _rope_linear_factor(reader: gguf.GGUFReader, arch: str) -> float:
    kind = str(_field(reader, f"{arch}.rope.scaling.type", "none"))
    factor = float(_field(reader, f"{arch}.rope.scaling.factor", 0.0))
    if kind == "none" or (kind == "linear" and factor in (0.0, 1.0)):
        return float(_field(reader, f"{arch}.rope.scale_linear", 1.0))
    if kind != "linear":
        raise ModelError(f"rope scaling {kind!r} is not supported (supported: linear, llama3 rope_freqs)")
    return factor


def read_config(reader: gguf.GGUFReader) -> ModelConfig:
    spec = architecture_of(reader)
    arch = spec.name
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    layers = int(_field(reader, f"{arch}.block_count"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // heads))
    value_dim = int(_field(reader, f"{arch}.attention.value_length", head_dim))
    if value_dim != head_dim:
        raise ModelError(f"key length {head_dim} != value length {value_dim} is not supported")
    rope_dims = int(_field(reader, f"{arch}.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise ModelError(f"partial rotary embedding ({rope_dims} of {head_dim} dims) is not supported")
    kv_heads = _field(reader, f"{arch}.attention.head_count_kv", heads)
    if isinstance(kv_heads, list):  # per-layer counts: only a uniform one is supported
        if len(set(kv_heads)) != 1:
            raise ModelError("layers with different numbers of KV heads are not supported")
        kv_heads = kv_heads[0]
    tensors = {t.name: t for t in reader.tensors}
    embedding = tensors.get("token_embd.weight")
    if embedding is None:
        raise ModelError("GGUF file has no token_embd.weight tensor (a vocabulary-only file?)")
    if "rope_factors_long.weight" in tensors or "rope_factors_short.weight" in tensors:
        raise ModelError("rope scaling 'longrope' (rope_factors_long/short) is not supported")
    window = int(_field(reader, f"{arch}.attention.sliding_window", 0)) if spec.sliding_window_pattern else 0
    local_theta = spec.local_rope_base
    if local_theta is not None:
        local_theta = float(_field(reader, f"{arch}.rope.freq_base_swa", local_theta))
    return ModelConfig(
        architecture=arch,
        vocab_size=int(_field(reader, f"{arch}.vocab_size", int(embedding.shape[-1]))),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(kv_heads),
        head_dim=head_dim,
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        context_length=int(_field(reader, f"{arch}.context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensors,
        rope_linear_factor=_rope_linear_factor(reader, arch),
        rope_local_theta=local_theta,
        sliding_window=window,
        sliding_window_pattern=spec.sliding_window_pattern if window else 0,
        attention_scale=_attention_scale(arch, hidden, heads, layers, head_dim),
        has_rope_freqs="rope_freqs.weight" in tensors,
    )


def _attention_scale(arch: str, hidden: int, heads: int, layers: int, head_dim: int) -> float | None:
    """Gemma 3 scales queries by query_pre_attn_scalar**-0.5, which the GGUF does not carry:
    as in llama.cpp, that is hidden/heads for the 27B model (62 layers), else head_dim."""
    if arch == "gemma3" and layers == 62:
        return 1.0 / math.sqrt(hidden / heads)
    return None


@cache
def dequantizable(qtype: gguf.GGMLQuantizationType) -> bool:
    """Whether the gguf package can turn tensors of ``qtype`` into float32."""
    if qtype in _FLOAT_TYPES:
        return True
    _, size = gguf.GGML_QUANT_SIZES.get(qtype, (0, 0))
    if not size:
        return False
    try:
        gguf.quants.dequantize(np.zeros((1, size), dtype=np.uint8), qtype)
    except (NotImplementedError, ValueError, KeyError):
        return False
    return True


def _dequantize(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """float32 of a tensor's data, a slice of rows at a time (the gguf package's dequantizers
    make several full-size temporaries)."""
    if data.ndim < 2 or data.shape[0] <= _ROWS_PER_CHUNK:
        return np.asarray(gguf.quants.dequantize(data, qtype), dtype=np.float32)
    first = np.asarray(gguf.quants.dequantize(data[:_ROWS_PER_CHUNK], qtype), dtype=np.float32)
    out = np.empty((data.shape[0], *first.shape[1:]), dtype=np.float32)
    out[:_ROWS_PER_CHUNK] = first
    for start in range(_ROWS_PER_CHUNK, data.shape[0], _ROWS_PER_CHUNK):
        out[start : start + _ROWS_PER_CHUNK] = gguf.quants.dequantize(
            data[start : start + _ROWS_PER_CHUNK], qtype
        )
    return out


def _unpermute_rotary_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    rows = weight.shape[0]
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


class GGUFSource:
    """One GGUF file: its config, its tokenizer metadata, and its tensors on demand."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        try:
            self.reader = gguf.GGUFReader(path)
        except (ValueError, OSError, KeyError) as exc:
            raise ModelError(f"{path} is not a readable GGUF file: {exc}") from exc
        self.path = path
        self.architecture = architecture_of(self.reader)
        self.config = read_config(self.reader)
        self._tensors = {t.name: t for t in self.reader.tensors}
        self._check_tensors()

    def _check_tensors(self) -> None:
        missing = [name for name in self.needed_tensors() if name not in self._tensors]
        if missing:
            shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
            raise ModelError(f"GGUF file lacks tensors the {self.architecture.name} graph needs: {shown}")
        bad = sorted({self._tensors[n].tensor_type.name for n in self.needed_tensors()
                      if not dequantizable(self._tensors[n].tensor_type)})  # fmt: skip
        if bad:
            raise ModelError(f"quantization type {', '.join(bad)} is not supported (no dequantizer)")

    def needed_tensors(self) -> list[str]:
        """Every tensor the graph reads, in the order the builder reads them."""
        cfg = self.config
        names = ["token_embd.weight"]
        if cfg.has_rope_freqs:
            names.append("rope_freqs.weight")
        for i in range(cfg.num_layers):
            names += [f"blk.{i}.{name}" for name in self.architecture.layer_tensors()]
        names.append("output_norm.weight")
        if not cfg.tie_word_embeddings:
            names.append("output.weight")
        return names

    def metadata(self, key: str, default: Any = None) -> Any:
        return _field(self.reader, key, default)

    def tensor_count(self) -> int:
        return len(self.needed_tensors())

    def quantization_types(self) -> dict[str, int]:
        """How many tensors of each type the file holds (for ``models inspect``)."""
        counts: dict[str, int] = {}
        for tensor in self._tensors.values():
            counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
        return counts

    def tensor(self, name: str) -> np.ndarray:
        """Tensor ``name`` as float32, numpy layout ([out, in] for matrices), with llama.cpp's
        q/k row permutation undone where the family has one."""
        tensor = self._tensors.get(name)
        if tensor is None:
            raise ModelError(f"GGUF file lacks tensor {name!r}")
        return self._unpermuted(name, _dequantize(tensor.data, tensor.tensor_type))

    def native_tensor(self, name: str) -> NativeWeight | None:
        """Matrix ``name`` in the file's own quantized values (for ``MatMulNBits``), or None
        where its type has no native mapping (float types, say). The q/k row permutation is
        undone on the raw block rows: a row's blocks move whole, so the values stay exact."""
        tensor = self._tensors.get(name)
        if tensor is None:
            raise ModelError(f"GGUF file lacks tensor {name!r}")
        if tensor.tensor_type not in NATIVE_TYPES or len(tensor.shape) != 2:
            return None
        raw = self._unpermuted(name, np.asarray(tensor.data))
        return from_gguf(raw, tensor.tensor_type, int(tensor.shape[0]))

    def _unpermuted(self, name: str, rows: np.ndarray) -> np.ndarray:
        if self.architecture.unpermute_qk:
            if name.endswith(".attn_q.weight"):
                return _unpermute_rotary_rows(rows, self.config.num_heads)
            if name.endswith(".attn_k.weight"):
                return _unpermute_rotary_rows(rows, self.config.num_kv_heads)
        return rows
