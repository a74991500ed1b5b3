"""Build a fast ONNX decoder graph for a Llama-family model from float32 weights.

The graph has the shape onnxruntime-genai's model builder emits, so the same file runs in
our runner and in ``onnxruntime_genai`` (for side-by-side benchmarks):

* ``GroupQueryAttention`` with packed QKV, rotary embedding inside the op (cos/sin caches),
  and past/present KV tensors ``[batch, kv_heads, seq, head_dim]`` that may share one
  buffer (the runner binds the same memory as past and present: no per-step cache copy);
* ``SimplifiedLayerNormalization`` / ``SkipSimplifiedLayerNormalization`` (residual fused);
* ``MatMulNBits`` weights (int8 or int4, block-wise) or plain ``MatMul`` (fp32);
* an lm_head that computes logits for the last position only.

Inputs: ``input_ids`` int64 [batch, seq], ``attention_mask`` int64 [batch, total]
(only its row sums and width are used: row sum = valid length of that row's cache after
this step), ``past_key_values.{i}.key|value``. Outputs: ``logits`` float32
[batch, 1, vocab], ``present.{i}.key|value``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.engine.models.gguf_source import LlamaConfig

MS_DOMAIN = "com.microsoft"
BLOCK_SIZE = 32


class Precision(StrEnum):
    INT8 = "int8"
    INT4 = "int4"
    FP32 = "fp32"


@dataclass(frozen=True, slots=True)
class QuantizedWeight:
    """A weight in MatMulNBits form: ``packed`` [N, blocks, blob], ``scales`` [N * blocks]."""

    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    n: int
    k: int

    def dequantize(self) -> np.ndarray:
        """The float32 [N, K] weight this stands for (for tests and quality checks)."""
        blocks = self.packed.shape[1]
        if self.bits == 8:
            q = self.packed.astype(np.float32)
            zp = np.full((self.n, blocks), 128.0, dtype=np.float32)
        else:
            q = np.stack([self.packed & 0x0F, self.packed >> 4], axis=-1).reshape(self.n, blocks, -1)
            q = q.astype(np.float32)
            assert self.zero_points is not None
            zp_nibbles = np.stack([self.zero_points & 0x0F, self.zero_points >> 4], axis=-1)
            zp = zp_nibbles.reshape(self.n, -1)[:, :blocks].astype(np.float32)
        w = (q - zp[:, :, None]) * self.scales.reshape(self.n, blocks)[:, :, None]
        return np.asarray(w.reshape(self.n, -1)[:, : self.k], dtype=np.float32)


def quantize_blockwise(weight: np.ndarray, bits: int, block_size: int = BLOCK_SIZE) -> QuantizedWeight:
    """Quantize a float32 [N, K] weight along K in blocks.

    8-bit is symmetric (implicit zero point 128); 4-bit is asymmetric with packed zero
    points, which keeps far more of the weight's information at that width.
    """
    n, k = weight.shape
    blocks = -(-k // block_size)
    padded = np.zeros((n, blocks * block_size), dtype=np.float32)
    padded[:, :k] = weight
    grouped = padded.reshape(n, blocks, block_size)
    if bits == 8:
        absmax = np.abs(grouped).max(axis=2)
        scales = np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)
        q = np.clip(np.rint(grouped / scales[:, :, None]), -127, 127) + 128
        return QuantizedWeight(q.astype(np.uint8), scales.reshape(-1), None, 8, n, k)
    if bits != 4:
        raise ValueError(f"unsupported bit width {bits}")
    lo = np.minimum(grouped.min(axis=2), 0.0)
    hi = np.maximum(grouped.max(axis=2), 0.0)
    scales = np.where(hi > lo, (hi - lo) / 15.0, 1.0).astype(np.float32)
    zp = np.clip(np.rint(-lo / scales), 0, 15).astype(np.uint8)
    q = np.clip(np.rint(grouped / scales[:, :, None]) + zp[:, :, None], 0, 15).astype(np.uint8)
    packed = (q[:, :, 0::2] | (q[:, :, 1::2] << 4)).astype(np.uint8)
    if blocks % 2:
        zp = np.concatenate([zp, np.zeros((n, 1), dtype=np.uint8)], axis=1)
    zp_packed = (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8).reshape(-1)
    return QuantizedWeight(packed, scales.reshape(-1), zp_packed, 4, n, k)


def rotary_caches(config: LlamaConfig, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables [max_positions, head_dim / 2], computed in float32 as transformers does."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    inv_freq = inv_freq.astype(np.float32)
    positions = np.arange(max_positions, dtype=np.float32)
    freqs = np.outer(positions, inv_freq).astype(np.float32)
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


class _Graph:
    def __init__(self, precision: Precision, accuracy_level: int) -> None:
        self.precision = precision
        self.accuracy_level = accuracy_level
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def init(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs: Any) -> None:
        self.nodes.append(
            helper.make_node(op, inputs, outputs, name=outputs[0] + "/" + op, domain=domain, **attrs)
        )

    def linear(self, name: str, x: str, weight: np.ndarray) -> str:
        """y = x @ weight.T for a float32 weight [out, in]."""
        out = f"{name}/out"
        if self.precision is Precision.FP32:
            self.node("MatMul", [x, self.init(f"{name}.weight", weight.T)], [out])
            return out
        q = quantize_blockwise(weight, 8 if self.precision is Precision.INT8 else 4)
        inputs = [x, self.init(f"{name}.qweight", q.packed), self.init(f"{name}.scales", q.scales)]
        if q.zero_points is not None:
            inputs.append(self.init(f"{name}.qzeros", q.zero_points))
        self.node(
            "MatMulNBits", inputs, [out], domain=MS_DOMAIN,
            K=q.k, N=q.n, bits=q.bits, block_size=BLOCK_SIZE, accuracy_level=self.accuracy_level,
        )  # fmt: skip
        return out


def build_llama_graph(
    config: LlamaConfig,
    weights: Iterable[tuple[str, np.ndarray]],
    *,
    precision: Precision = Precision.INT8,
    accuracy_level: int = 0,
    max_positions: int | None = None,
    on_tensor: Callable[[str], None] | None = None,
) -> onnx.ModelProto:
    """Return the decoder graph. ``weights`` yields (HF name, float32 array) in any order."""
    w: dict[str, np.ndarray] = {}
    for name, array in weights:
        w[name] = array
        if on_tensor is not None:
            on_tensor(name)
    g = _Graph(precision, accuracy_level)
    cfg = config
    eps = cfg.rms_norm_eps
    positions = max_positions or cfg.context_length

    int64_max = np.iinfo(np.int64).max
    g.init("const.one", np.array([1], dtype=np.int64))
    g.init("const.axis1", np.array([1], dtype=np.int64))
    g.init("const.last_start", np.array([-1], dtype=np.int64))
    g.init("const.last_end", np.array([int64_max], dtype=np.int64))
    cos, sin = rotary_caches(cfg, positions)
    g.init("cos_cache", cos)
    g.init("sin_cache", sin)

    # seqlens_k = rowsum(mask) - 1 (int32); total_sequence_length = mask width (int32).
    g.node("ReduceSum", ["attention_mask", "const.axis1"], ["mask/rowsum"], keepdims=0)
    g.node("Sub", ["mask/rowsum", "const.one"], ["mask/seqlens_k_i64"])
    g.node("Cast", ["mask/seqlens_k_i64"], ["seqlens_k"], to=TensorProto.INT32)
    g.node("Shape", ["attention_mask"], ["mask/shape"])
    g.node("Gather", ["mask/shape", "const.one"], ["mask/total_i64"], axis=0)
    g.node("Cast", ["mask/total_i64"], ["total_sequence_length"], to=TensorProto.INT32)

    g.node("Gather", [g.init("embed_tokens.weight", w["embed_tokens.weight"]), "input_ids"], ["embed/out"])
    residual = "embed/out"
    mlp_out: str | None = None
    for i in range(cfg.num_layers):
        p = f"layers.{i}"
        ln1 = g.init(f"{p}.input_layernorm.weight", w[f"{p}.input_layernorm.weight"])
        if mlp_out is None:
            g.node(
                "SimplifiedLayerNormalization",
                [residual, ln1],
                [f"{p}/ln1"],
                axis=-1,
                epsilon=eps,
                stash_type=1,
            )
        else:
            g.node(
                "SkipSimplifiedLayerNormalization", [mlp_out, residual, ln1],
                [f"{p}/ln1", "", "", f"{p}/resid1"], domain=MS_DOMAIN, epsilon=eps,
            )  # fmt: skip
            residual = f"{p}/resid1"
        qkv_weight = np.concatenate(
            [
                w[f"{p}.self_attn.q_proj.weight"],
                w[f"{p}.self_attn.k_proj.weight"],
                w[f"{p}.self_attn.v_proj.weight"],
            ]
        )
        qkv = g.linear(f"{p}.attn.qkv_proj", f"{p}/ln1", qkv_weight)
        g.node(
            "GroupQueryAttention",
            [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value",
             "seqlens_k", "total_sequence_length", "cos_cache", "sin_cache"],
            [f"{p}/attn", f"present.{i}.key", f"present.{i}.value"],
            domain=MS_DOMAIN, num_heads=cfg.num_heads, kv_num_heads=cfg.num_kv_heads,
            do_rotary=1, rotary_interleaved=0, local_window_size=-1,
        )  # fmt: skip
        attn_out = g.linear(f"{p}.attn.o_proj", f"{p}/attn", w[f"{p}.self_attn.o_proj.weight"])
        ln2 = g.init(f"{p}.post_attention_layernorm.weight", w[f"{p}.post_attention_layernorm.weight"])
        g.node(
            "SkipSimplifiedLayerNormalization", [attn_out, residual, ln2],
            [f"{p}/ln2", "", "", f"{p}/resid2"], domain=MS_DOMAIN, epsilon=eps,
        )  # fmt: skip
        residual = f"{p}/resid2"
        gate = g.linear(f"{p}.mlp.gate_proj", f"{p}/ln2", w[f"{p}.mlp.gate_proj.weight"])
        up = g.linear(f"{p}.mlp.up_proj", f"{p}/ln2", w[f"{p}.mlp.up_proj.weight"])
        g.node("Sigmoid", [gate], [f"{p}/gate_sigmoid"])
        g.node("Mul", [gate, f"{p}/gate_sigmoid"], [f"{p}/silu"])
        g.node("Mul", [f"{p}/silu", up], [f"{p}/mlp_in"])
        mlp_out = g.linear(f"{p}.mlp.down_proj", f"{p}/mlp_in", w[f"{p}.mlp.down_proj.weight"])
    assert mlp_out is not None

    # Only the last position's logits are ever used: slice before the final norm and lm_head.
    last = ["const.last_start", "const.last_end", "const.axis1"]
    g.node("Slice", [mlp_out, *last], ["final/mlp_last"])
    g.node("Slice", [residual, *last], ["final/resid_last"])
    final_norm = g.init("norm.weight", w["norm.weight"])
    g.node(
        "SkipSimplifiedLayerNormalization", ["final/mlp_last", "final/resid_last", final_norm],
        ["final/norm"], domain=MS_DOMAIN, epsilon=eps,
    )  # fmt: skip
    lm_head = w["embed_tokens.weight"] if cfg.tie_word_embeddings else w["lm_head.weight"]
    logits = g.linear("lm_head", "final/norm", lm_head)
    g.node("Identity", [logits], ["logits"])

    kv_shape: list[str | int] = ["batch_size", cfg.num_kv_heads, "past_sequence_length", cfg.head_dim]
    present_shape: list[str | int] = ["batch_size", cfg.num_kv_heads, "total_sequence_length", cfg.head_dim]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info(
            "attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]
        ),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", 1, cfg.vocab_size])]
    for i in range(cfg.num_layers):
        for kind in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", TensorProto.FLOAT, kv_shape)
            )
            outputs.append(
                helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT, present_shape)
            )
    graph = helper.make_graph(g.nodes, "llama_decoder", inputs, outputs, g.initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS_DOMAIN, 1)],
        producer_name="localchat-builder",
    )
    model.ir_version = 10
    return model


def save_model(model: onnx.ModelProto, path: str) -> None:
    """Save with weights in one external data file beside the graph (no 2 GB protobuf cap)."""
    onnx.save_model(
        model, path, save_as_external_data=True, all_tensors_to_one_file=True,
        location=path.rsplit("/", 1)[-1] + ".data", size_threshold=1024,
    )  # fmt: skip
