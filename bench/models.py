"""Synthetic GGUF files in the exact shapes of real models, for benchmarks at real sizes.

Shapes: Llama 3.2 1B, Llama 3.1 8B, Qwen2.5 0.5B, and ``llama-tiny`` (for checking
benchmarks on the CPU). The vocabulary is SmolLM2's (49152 tokens), not the real models'
(Llama 3's is 128256), so the embedding table and lm_head are smaller than the originals.

    .venv/bin/python bench/models.py [--data-dir DIR] [--shape llama-3.2-1b] [--type Q4_0] ...

Speed does not depend on the weights' values, so the weights are random bytes in each
quantized type's exact block layout (with small, finite f16 scales); nothing is downloaded.
The vocabulary and tokenizer are SmolLM2's (copied from the default GGUF), so the files
load in our service and in llama.cpp alike. Each file is written once into
``<data-dir>/gguf/synthetic/`` and reused. Where a matrix's input width is not a multiple of
a K-quant's 256-value super-block (Qwen2.5-0.5B's 896), that matrix falls back to Q5_0, as
llama.cpp's quantizer does; Qwen's q/k/v biases are left out (the llama architecture).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script: python bench/models.py
    sys.path.insert(0, str(REPO_ROOT))

import gguf  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402

from service.engine.models.default_model import fetch_default_gguf  # noqa: E402


@dataclass(frozen=True, slots=True)
class Shape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    rope_theta: float

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


SHAPES = {
    s.name: s
    for s in (
        Shape(
            "llama-3.2-1b",
            hidden=2048,
            intermediate=8192,
            layers=16,
            heads=32,
            kv_heads=8,
            rope_theta=500000.0,
        ),
        Shape(
            "llama-3.1-8b",
            hidden=4096,
            intermediate=14336,
            layers=32,
            heads=32,
            kv_heads=8,
            rope_theta=500000.0,
        ),
        # A shape small enough to run bench/gpu.sh on the CPU as its check (DEVICE=cpu).
        Shape(
            "llama-tiny",
            hidden=256,
            intermediate=512,
            layers=2,
            heads=4,
            kv_heads=2,
            rope_theta=10000.0,
        ),
        Shape(
            "qwen2.5-0.5b",
            hidden=896,
            intermediate=4864,
            layers=24,
            heads=14,
            kv_heads=2,
            rope_theta=1000000.0,
        ),
    )
}
TYPES = {t.name: t for t in (T.Q4_0, T.Q4_K, T.Q8_0)}
# Byte offset of the first f16 scale field in a block, and how many f16 fields follow it.
_F16_FIELDS = {
    T.Q4_0: (0, 1), T.Q4_1: (0, 2), T.Q5_0: (0, 1), T.Q8_0: (0, 1),
    T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208, 1), T.Q2_K: (80, 2), T.Q3_K: (108, 1),
}  # fmt: skip


def _type_for(qtype: T, k: int) -> T:
    elements, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if k % elements == 0 else T.Q5_0


def random_blocks(qtype: T, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """[rows, bytes] of ``qtype`` with random codes and small positive f16 scales."""
    elements, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows * cols // elements, type_size), dtype=np.uint8)
    start, count = _F16_FIELDS[qtype]
    scales = rng.uniform(1e-4, 1e-3, (blocks.shape[0], count)).astype(np.float16)
    blocks[:, start : start + 2 * count] = scales.view(np.uint8)
    return blocks.reshape(rows, -1)


def synthetic_path(data_dir: Path, shape: Shape, qtype: T) -> Path:
    return data_dir / "gguf" / "synthetic" / f"{shape.name}-synthetic.{qtype.name}.gguf"


def write_synthetic(path: Path, shape: Shape, qtype: T, tokenizer_gguf: Path, seed: int = 0) -> Path:
    """Write ``shape`` in ``qtype`` to ``path`` (atomically: a partial file is never left there)."""
    reader = gguf.GGUFReader(tokenizer_gguf)
    vocab = len(reader.fields["tokenizer.ggml.tokens"].contents())
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(partial, "llama")
    writer.add_name(f"{shape.name}-synthetic")
    writer.add_vocab_size(vocab)
    writer.add_context_length(4096)
    writer.add_embedding_length(shape.hidden)
    writer.add_feed_forward_length(shape.intermediate)
    writer.add_block_count(shape.layers)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_rope_freq_base(shape.rope_theta)
    writer.add_layer_norm_rms_eps(1e-5)
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            sub_type = field.types[1] if len(field.types) > 1 else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub_type)

    def matrix(name: str, rows: int, cols: int) -> None:
        kind = _type_for(qtype, cols)
        raw = random_blocks(kind, rows, cols, rng)
        writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=kind)

    def norm(name: str) -> None:
        writer.add_tensor(name, np.ones(shape.hidden, dtype=np.float32))

    q_rows, kv_rows = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    matrix("token_embd.weight", vocab, shape.hidden)
    for i in range(shape.layers):
        p = f"blk.{i}"
        norm(f"{p}.attn_norm.weight")
        matrix(f"{p}.attn_q.weight", q_rows, shape.hidden)
        matrix(f"{p}.attn_k.weight", kv_rows, shape.hidden)
        matrix(f"{p}.attn_v.weight", kv_rows, shape.hidden)
        matrix(f"{p}.attn_output.weight", shape.hidden, q_rows)
        norm(f"{p}.ffn_norm.weight")
        matrix(f"{p}.ffn_gate.weight", shape.intermediate, shape.hidden)
        matrix(f"{p}.ffn_up.weight", shape.intermediate, shape.hidden)
        matrix(f"{p}.ffn_down.weight", shape.hidden, shape.intermediate)
    norm("output_norm.weight")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(path)
    return path


def ensure_synthetic(data_dir: Path, shape: Shape, qtype: T) -> Path:
    """The synthetic file for ``shape`` in ``qtype``, written on first use."""
    path = synthetic_path(data_dir, shape, qtype)
    if not path.is_file():
        write_synthetic(path, shape, qtype, fetch_default_gguf(data_dir))
    return path


def main(argv: list[str] | None = None) -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT / ".cache")
    parser.add_argument("--shape", action="append", choices=sorted(SHAPES), help="default: all")
    parser.add_argument("--type", action="append", choices=sorted(TYPES), help="default: all")
    args = parser.parse_args(argv)
    for shape_name in args.shape or sorted(SHAPES):
        for type_name in args.type or sorted(TYPES):
            path = ensure_synthetic(args.data_dir, SHAPES[shape_name], TYPES[type_name])
            print(f"{path} ({path.stat().st_size / 2**20:.0f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
