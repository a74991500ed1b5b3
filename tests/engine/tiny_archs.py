"""Tiny random-weight GGUF files of every supported architecture, for fidelity tests.

Each file uses its family's own llama.cpp tensor names and metadata keys, and mixes
quantization types as downloaded files do (Q4_K_M files mix Q4_K and Q6_K): one type for
the attention matrices, another for the MLP, embedding and output matrices, F32 for norms
and biases (as llama.cpp writes them). The vocabulary is the real SmolLM2 one, so a
reference implementation reads the file like a downloaded one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np

if TYPE_CHECKING:
    from pathlib import Path

QType = gguf.GGMLQuantizationType


@dataclass(frozen=True, slots=True)
class TinyArch:
    """The shape of one tiny model; ``arch`` is the GGUF ``general.architecture``."""

    arch: str
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    intermediate: int = 128
    context: int = 256
    rope_base: float = 10000.0
    eps: float = 1e-5
    tied: bool = True
    qkv_bias: bool = False
    fused: bool = False  # attn_qkv and ffn_up (gate + up) as single matrices (phi3)
    qk_norm: bool = False
    sandwich_norms: bool = False
    sliding_window: int = 0
    # Llama 3.x rope scaling (factor, low_freq_factor, high_freq_factor, original context),
    # written as llama.cpp writes it: a ``rope_freqs.weight`` tensor of per-frequency divisors.
    llama3_rope: tuple[float, float, float, int] | None = None


TINY_ARCHS: dict[str, TinyArch] = {
    "llama": TinyArch("llama"),
    # Llama 3.x: a large rope base and a small original context, so the scaling matters
    # within a short test sequence.
    "llama3": TinyArch("llama", rope_base=500000.0, llama3_rope=(8.0, 1.0, 4.0, 64)),
    "qwen2": TinyArch("qwen2", tied=False, qkv_bias=True, rope_base=1000000.0, eps=1e-6),
    # Qwen 3: heads * head_dim (128) differs from the hidden size (64), as in the real models.
    "phi3": TinyArch("phi3", heads=4, kv_heads=4, fused=True, tied=False),
    "qwen3": TinyArch("qwen3", head_dim=32, qk_norm=True, rope_base=1000000.0, eps=1e-6),
    # Gemma 3: six layers, so the pattern has five local layers and one global one; a window
    # of 8 so that test prompts run past it.
    "gemma3": TinyArch(
        "gemma3",
        layers=6,
        heads=2,
        kv_heads=1,
        qk_norm=True,
        sandwich_norms=True,
        sliding_window=8,
        rope_base=1000000.0,
        eps=1e-6,
    ),
}


def llama3_rope_factors(head_dim: int, base: float, scaling: tuple[float, float, float, int]) -> np.ndarray:
    """llama.cpp's ``rope_freqs.weight`` for Llama 3.x scaling: one divisor per frequency."""
    factor, low, high, original = scaling
    inv_freq = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    low_wavelen, high_wavelen = original / low, original / high
    smooth = (original / wavelen - low) / (high - low)
    factors = np.where(
        wavelen < high_wavelen,
        1.0,
        np.where(wavelen > low_wavelen, factor, 1.0 / ((1 - smooth) / factor + smooth)),
    )
    return factors.astype(np.float32)


_PER_TOKEN = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")


@functools.cache
def _tokenizer_fields(
    real_gguf: Path, limit: int | None
) -> dict[str, tuple[Any, gguf.GGUFValueType, gguf.GGUFValueType | None]]:
    """The file's ``tokenizer.*`` keys as (value, type, item type), cut to ``limit`` tokens (read
    once per file: parsing a real vocabulary takes seconds)."""
    fields = {}
    for key, field in gguf.GGUFReader(real_gguf).fields.items():
        if key.startswith("tokenizer."):
            fields[key] = (field.contents(), field.types[0], field.types[1] if len(field.types) > 1 else None)
    if limit is not None:
        for key in _PER_TOKEN:
            if key in fields:
                value, kind, item = fields[key]
                fields[key] = (value[:limit], kind, item)
        kept = set(fields["tokenizer.ggml.tokens"][0])
        if "tokenizer.ggml.merges" in fields:
            merges, kind, item = fields["tokenizer.ggml.merges"]
            pairs = [
                merge
                for merge in merges
                if all(part in kept for part in (*merge.split(" "), merge.replace(" ", "")))
            ]
            fields["tokenizer.ggml.merges"] = (pairs, kind, item)
    return fields


def write_tiny_arch_gguf(
    path: Path,
    real_gguf: Path | None,
    spec: TinyArch,
    attention_qtype: QType,
    mlp_qtype: QType,
    *,
    seed: int = 0,
    extra_metadata: dict[str, str] | None = None,
    skip: frozenset[str] = frozenset(),
    vocab_limit: int | None = None,
) -> Path:
    """Write ``spec`` to ``path`` with ``real_gguf``'s vocabulary (none and 256 rows when
    None): attention matrices in ``attention_qtype``, the other matrices in ``mlp_qtype``.
    ``extra_metadata`` adds string keys; ``skip`` leaves tensors out (for broken files).
    ``vocab_limit`` keeps only the vocabulary's first tokens (and the merges among them): a
    byte-level BPE still encodes any text, and readers parse the file in a fraction of the time."""
    tokenizer = _tokenizer_fields(real_gguf, vocab_limit) if real_gguf is not None else {}
    vocab = len(tokenizer["tokenizer.ggml.tokens"][0]) if real_gguf is not None else 256
    rng = np.random.default_rng(seed)
    arch = spec.arch

    def matrix(name: str, rows: int, cols: int, std: float) -> None:
        weight = (rng.standard_normal((rows, cols)) * std).astype(np.float32)
        qtype = attention_qtype if ".attn_" in name else mlp_qtype
        if name in skip:
            return
        if qtype == QType.F32:
            writer.add_tensor(name, weight)
        elif qtype == QType.F16:
            writer.add_tensor(name, weight.astype(np.float16))
        elif qtype not in gguf.quants._type_traits:  # no quantizer: zero blocks of the right size
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            writer.add_tensor(name, np.zeros((rows, cols // block * size), dtype=np.uint8), raw_dtype=qtype)
        else:
            writer.add_tensor(name, gguf.quants.quantize(weight, qtype), raw_dtype=qtype)

    def vector(name: str, size: int, mean: float, std: float) -> None:
        if name in skip:
            return
        writer.add_tensor(name, (mean + std * rng.standard_normal(size)).astype(np.float32))

    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(f"tiny-random-{arch}")
    writer.add_vocab_size(vocab)
    writer.add_context_length(spec.context)
    writer.add_embedding_length(spec.hidden)
    writer.add_feed_forward_length(spec.intermediate)
    writer.add_block_count(spec.layers)
    writer.add_head_count(spec.heads)
    writer.add_head_count_kv(spec.kv_heads)
    writer.add_key_length(spec.head_dim)
    writer.add_value_length(spec.head_dim)
    if arch in ("llama", "phi3"):  # llama.cpp writes the rope dimension for these families
        writer.add_rope_dimension_count(spec.head_dim)
    writer.add_rope_freq_base(spec.rope_base)
    writer.add_layer_norm_rms_eps(spec.eps)
    if spec.sliding_window:
        writer.add_sliding_window(spec.sliding_window)
    for key, text in (extra_metadata or {}).items():
        writer.add_string(key, text)
    for key, (value, value_type, sub_type) in tokenizer.items():
        writer.add_key_value(key, value, value_type, sub_type=sub_type)

    # numpy shapes are [out, in]; GGUF records them reversed, as llama.cpp expects.
    h, q_rows, kv_rows = spec.hidden, spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    # Gemma's norm weights are stored with the +1 its RMSNorm adds: centre them on 1 everywhere.
    matrix("token_embd.weight", vocab, h, 0.5)
    if spec.llama3_rope is not None:
        factors = llama3_rope_factors(spec.head_dim, spec.rope_base, spec.llama3_rope)
        writer.add_tensor("rope_freqs.weight", factors)
    for i in range(spec.layers):
        p = f"blk.{i}"
        vector(f"{p}.attn_norm.weight", h, 1.0, 0.1)
        if spec.fused:
            matrix(f"{p}.attn_qkv.weight", q_rows + 2 * kv_rows, h, h**-0.5)
        else:
            matrix(f"{p}.attn_q.weight", q_rows, h, h**-0.5)
            matrix(f"{p}.attn_k.weight", kv_rows, h, h**-0.5)
            matrix(f"{p}.attn_v.weight", kv_rows, h, h**-0.5)
        if spec.qkv_bias:
            vector(f"{p}.attn_q.bias", q_rows, 0.0, 0.5)
            vector(f"{p}.attn_k.bias", kv_rows, 0.0, 0.5)
            vector(f"{p}.attn_v.bias", kv_rows, 0.0, 0.5)
        if spec.qk_norm:
            vector(f"{p}.attn_q_norm.weight", spec.head_dim, 1.0, 0.1)
            vector(f"{p}.attn_k_norm.weight", spec.head_dim, 1.0, 0.1)
        matrix(f"{p}.attn_output.weight", h, q_rows, q_rows**-0.5)
        if spec.sandwich_norms:
            vector(f"{p}.post_attention_norm.weight", h, 1.0, 0.1)
        vector(f"{p}.ffn_norm.weight", h, 1.0, 0.1)
        if spec.fused:
            matrix(f"{p}.ffn_up.weight", 2 * spec.intermediate, h, h**-0.5)
        else:
            matrix(f"{p}.ffn_gate.weight", spec.intermediate, h, h**-0.5)
            matrix(f"{p}.ffn_up.weight", spec.intermediate, h, h**-0.5)
        matrix(f"{p}.ffn_down.weight", h, spec.intermediate, spec.intermediate**-0.5)
        if spec.sandwich_norms:
            vector(f"{p}.post_ffw_norm.weight", h, 1.0, 0.1)
    vector("output_norm.weight", h, 1.0, 0.1)
    if not spec.tied:
        matrix("output.weight", vocab, h, 0.5)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
