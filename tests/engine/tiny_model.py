"""A tiny random-weight Llama GGUF with the real SmolLM2 tokenizer, for fast engine tests.

Weights are F32 with llama.cpp tensor names. The q/k rotary permutation llama.cpp applies
is only a row reordering, so random weights need no special treatment. The embeddings are
large enough (std 0.5, tied lm_head) that logits are well separated and greedy choices are
not near-ties that int8 rounding could flip.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import gguf
import numpy as np

if TYPE_CHECKING:
    from pathlib import Path

TINY_HIDDEN = 64
TINY_LAYERS = 2
TINY_HEADS = 4
TINY_KV_HEADS = 2
TINY_HEAD_DIM = TINY_HIDDEN // TINY_HEADS  # 16: GroupQueryAttention's rotary needs a multiple of 16
TINY_INTERMEDIATE = 128
TINY_CONTEXT = 256


def write_tiny_gguf(
    path: Path, real_gguf: Path, seed: int = 0, *, context_length: int = TINY_CONTEXT
) -> Path:
    """Write the tiny model to ``path``, copying all tokenizer metadata from ``real_gguf``."""
    reader = gguf.GGUFReader(real_gguf)
    vocab = len(reader.fields["tokenizer.ggml.tokens"].contents())
    rng = np.random.default_rng(seed)

    def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def norm_weight() -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(TINY_HIDDEN)).astype(np.float32)

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny-random-llama")
    writer.add_vocab_size(vocab)
    writer.add_context_length(context_length)
    writer.add_embedding_length(TINY_HIDDEN)
    writer.add_feed_forward_length(TINY_INTERMEDIATE)
    writer.add_block_count(TINY_LAYERS)
    writer.add_head_count(TINY_HEADS)
    writer.add_head_count_kv(TINY_KV_HEADS)
    writer.add_rope_dimension_count(TINY_HEAD_DIM)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            sub_type = field.types[1] if len(field.types) > 1 else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub_type)

    # numpy shapes are [out, in]; GGUF records them reversed, as llama.cpp expects.
    q_rows, kv_rows = TINY_HEADS * TINY_HEAD_DIM, TINY_KV_HEADS * TINY_HEAD_DIM
    writer.add_tensor("token_embd.weight", normal((vocab, TINY_HIDDEN), 0.5))
    for i in range(TINY_LAYERS):
        p = f"blk.{i}"
        writer.add_tensor(f"{p}.attn_norm.weight", norm_weight())
        writer.add_tensor(f"{p}.attn_q.weight", normal((q_rows, TINY_HIDDEN), TINY_HIDDEN**-0.5))
        writer.add_tensor(f"{p}.attn_k.weight", normal((kv_rows, TINY_HIDDEN), TINY_HIDDEN**-0.5))
        writer.add_tensor(f"{p}.attn_v.weight", normal((kv_rows, TINY_HIDDEN), TINY_HIDDEN**-0.5))
        writer.add_tensor(f"{p}.attn_output.weight", normal((TINY_HIDDEN, q_rows), q_rows**-0.5))
        writer.add_tensor(f"{p}.ffn_norm.weight", norm_weight())
        writer.add_tensor(f"{p}.ffn_gate.weight", normal((TINY_INTERMEDIATE, TINY_HIDDEN), TINY_HIDDEN**-0.5))
        writer.add_tensor(f"{p}.ffn_up.weight", normal((TINY_INTERMEDIATE, TINY_HIDDEN), TINY_HIDDEN**-0.5))
        writer.add_tensor(
            f"{p}.ffn_down.weight", normal((TINY_HIDDEN, TINY_INTERMEDIATE), TINY_INTERMEDIATE**-0.5)
        )
    writer.add_tensor("output_norm.weight", norm_weight())

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
