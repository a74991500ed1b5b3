"""Tiny random Llama GGUFs whose 2-D tensors are stored in one quantized type.

Types ``gguf.quants.quantize`` supports are quantized from normal weights; for the K-quants
(which it cannot write) the blocks are random bytes with small f16 scales, in their exact
layout. The embedding table is quantized too and tied to the output, so the tied lm_head
path is covered. Dimensions are multiples of 256 (the K-quants' super-block); the vocabulary
is small and there is no tokenizer: these models are driven with token ids.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import onnxruntime as ort
from gguf import GGMLQuantizationType as T

HIDDEN = 256
INTERMEDIATE = 512
LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
VOCAB = 512
CONTEXT = 128
# Layers write strongly into the residual stream, so the next token is not an echo of the last one.
OUT_GAIN = 8.0

QUANTIZABLE = frozenset({T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0})
# Byte ranges of each K-quant block that hold f16 scales (random bytes there could be NaN/inf),
# and the magnitude that keeps a random matrix's output about the size of its input.
_F16_FIELDS = {T.Q2_K: (80, 84), T.Q3_K: (108, 110), T.Q4_K: (0, 4), T.Q5_K: (0, 4), T.Q6_K: (208, 210)}
_F16_SCALE = {T.Q2_K: 3e-3, T.Q3_K: 2e-3, T.Q4_K: 5e-4, T.Q5_K: 2.5e-4, T.Q6_K: 1e-3}
# dmin / d that centres the values of the types with minimums (the mean code), and dmin's bytes.
_CENTRE = {T.Q2_K: (1.5, 82), T.Q4_K: (7.5, 2), T.Q5_K: (15.5, 2)}


def quantized_blocks(qtype: T, rows: int, cols: int, std: float, rng: np.random.Generator) -> np.ndarray:
    """A [rows, bytes] tensor of ``qtype`` holding about ``std``-sized values."""
    if qtype in QUANTIZABLE:
        values = rng.standard_normal((rows, cols)).astype(np.float32) * std
        return np.asarray(gguf.quants.quantize(values, qtype))
    elements, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows * cols // elements, type_size), dtype=np.uint8)
    lo, hi = _F16_FIELDS[qtype]
    magnitude = _F16_SCALE[qtype] * std * np.sqrt(HIDDEN)
    scales = rng.uniform(0.5, 1.0, (blocks.shape[0], (hi - lo) // 2)) * magnitude
    if qtype in _CENTRE:
        ratio, at = _CENTRE[qtype]
        scales[:, (at - lo) // 2] = scales[:, (at - lo) // 2 - 1] * ratio
    blocks[:, lo:hi] = scales.astype(np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


def write_quant_gguf(path: Path, qtype: T, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(f"tiny-{qtype.name}")
    writer.add_vocab_size(VOCAB)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INTERMEDIATE)
    writer.add_block_count(LAYERS)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)

    def matrix(name: str, rows: int, cols: int, std: float) -> None:
        raw = quantized_blocks(qtype, rows, cols, std, rng)
        writer.add_tensor(name, raw, raw_shape=raw.shape, raw_dtype=qtype)

    def norm(name: str) -> None:
        writer.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))

    q_rows, kv_rows = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    matrix("token_embd.weight", VOCAB, HIDDEN, 0.5)
    for i in range(LAYERS):
        p = f"blk.{i}"
        norm(f"{p}.attn_norm.weight")
        matrix(f"{p}.attn_q.weight", q_rows, HIDDEN, HIDDEN**-0.5)
        matrix(f"{p}.attn_k.weight", kv_rows, HIDDEN, HIDDEN**-0.5)
        matrix(f"{p}.attn_v.weight", kv_rows, HIDDEN, HIDDEN**-0.5)
        matrix(f"{p}.attn_output.weight", HIDDEN, q_rows, OUT_GAIN * q_rows**-0.5)
        norm(f"{p}.ffn_norm.weight")
        matrix(f"{p}.ffn_gate.weight", INTERMEDIATE, HIDDEN, HIDDEN**-0.5)
        matrix(f"{p}.ffn_up.weight", INTERMEDIATE, HIDDEN, HIDDEN**-0.5)
        matrix(f"{p}.ffn_down.weight", HIDDEN, INTERMEDIATE, OUT_GAIN * INTERMEDIATE**-0.5)
    norm("output_norm.weight")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


class Decoder:
    def __init__(self, model_file: Path) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(model_file), options, providers=providers)

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits after each prefix of ``ids``, one token per step (decode mode)."""
        past = {
            f"past_key_values.{i}.{kind}": np.zeros((1, KV_HEADS, 0, HEAD_DIM), dtype=np.float32)
            for i in range(LAYERS)
            for kind in ("key", "value")
        }
        rows = []
        for position, token in enumerate(ids):
            feeds = {
                "input_ids": np.array([[token]], dtype=np.int64),
                "attention_mask": np.ones((1, position + 1), dtype=np.int64),
                **past,
            }
            logits, *present = self.session.run(None, feeds)
            past = dict(zip(past, present, strict=True))
            rows.append(logits[0, -1])
        return np.stack(rows)

    def greedy(self, prompt: list[int], steps: int) -> list[int]:
        ids = list(prompt)
        for _ in range(steps):
            ids.append(int(self.logits(ids)[-1].argmax()))
        return ids[len(prompt) :]
