"""Read a Llama-family GGUF file into plain float32 weights with Hugging Face names and layout.

llama.cpp's converter permutes the rows of the query and key projections so that its
"adjacent pairs" rotary embedding matches Hugging Face's "rotate half" one. We undo that
permutation, so the ONNX graph uses the standard (non-interleaved) rotary layout, exactly
as a model exported from the original checkpoint would.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from service.errors import ModelError

SUPPORTED_ARCHITECTURES = frozenset({"llama"})


@dataclass(frozen=True, slots=True)
class LlamaConfig:
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

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise ModelError(f"GGUF metadata lacks {key!r}")
        return default
    return field.contents()


def read_config(reader: gguf.GGUFReader) -> LlamaConfig:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelError(f"GGUF architecture {arch!r} is not supported (supported: llama family)")
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    tensor_names = {t.name for t in reader.tensors}
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    return LlamaConfig(
        vocab_size=int(_field(reader, f"{arch}.vocab_size", int(embedding.shape[-1]))),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        num_layers=int(_field(reader, f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(_field(reader, f"{arch}.attention.key_length", hidden // heads)),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        context_length=int(_field(reader, f"{arch}.context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensor_names,
    )


def _unpermute_rotary_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    rows = weight.shape[0]
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _LAYER_NAMES:
        return f"layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return None


class GGUFSource:
    """One GGUF file: its config, its tokenizer metadata and its weights (float32, HF layout)."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        try:
            self.reader = gguf.GGUFReader(path)
        except (ValueError, OSError) as exc:
            raise ModelError(f"{path} is not a readable GGUF file: {exc}") from exc
        self.path = path
        self.config = read_config(self.reader)
        self._tensors = {t.name: t for t in self.reader.tensors}

    def metadata(self, key: str, default: Any = None) -> Any:
        return _field(self.reader, key, default)

    def tensor_count(self) -> int:
        return sum(1 for name in self._tensors if _hf_name(name) is not None)

    def weights(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yield (HF name, float32 array [out, in] or [n]) one tensor at a time."""
        cfg = self.config
        for name, tensor in self._tensors.items():
            hf = _hf_name(name)
            if hf is None:
                continue
            array = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
            if hf.endswith("q_proj.weight"):
                array = _unpermute_rotary_rows(array, cfg.num_heads)
            elif hf.endswith("k_proj.weight"):
                array = _unpermute_rotary_rows(array, cfg.num_kv_heads)
            yield hf, array
