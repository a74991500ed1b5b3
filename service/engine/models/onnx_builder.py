"""Build a fast ONNX decoder graph from a GGUF model, for every family in ``architectures``.

The graph has the shape onnxruntime-genai's model builder emits, so the same file runs in
our runner and in ``onnxruntime_genai`` (for side-by-side benchmarks):

* ``GroupQueryAttention`` with rotary embedding inside the op (cos/sin caches), and
  past/present KV tensors ``[batch, kv_heads, seq, head_dim]`` that may share one buffer
  (the runner binds the same memory as past and present: no per-step cache copy). Q, K and
  V come packed from one projection; families that normalize q and k per head first
  (Qwen 3, Gemma 3) pass them unpacked, normalized, to the same op;
* ``SimplifiedLayerNormalization`` / ``SkipSimplifiedLayerNormalization`` (residual fused);
* ``MatMulNBits`` weights (int8 or int4, block-wise; or ``native``: the GGUF's own quantized
  values and bits, see :mod:`native_quant`) or plain ``MatMul`` (fp32);
* an lm_head that computes logits for the last position only.

The float type of activations, KV cache and logits is float32, or float16 for the ``fp16``
and ``native-fp16`` builds (the CUDA precisions: GroupQueryAttention on CUDA takes fp16 or
bf16 only). There every float initializer is fp16 too, MatMulNBits scales included, so the
graph holds no Cast. bf16 is not built: ORT's CPU provider has no bf16 kernels for these ops,
so nothing here could run or check such a graph.

Inputs: ``input_ids`` int64 [batch, seq], ``attention_mask`` int64 [batch, total]
(only its row sums and width are used: row sum = valid length of that row's cache after
this step), ``past_key_values.{i}.key|value``. Outputs: ``logits`` [batch, 1, vocab],
``present.{i}.key|value`` (all in the build's float type).

Weights are read one tensor at a time and written straight to the external data file as
they are converted, so memory stays near one float32 tensor whatever the model's size.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from service.engine.models.architectures import Architecture, MLPKind
from service.engine.models.native_linear import emit_native_linear, emit_native_lookup
from service.engine.models.native_quant import NativeWeight, stack_rows

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from service.engine.models.gguf_source import ModelConfig

MS_DOMAIN = "com.microsoft"
BLOCK_SIZE = 32
_INLINE_BYTES = 1024  # smaller tensors stay inside the graph file
_ALIGN = 4096  # external tensors start on page boundaries (ORT can map them)


class Precision(StrEnum):
    NATIVE = "native"  # the GGUF's own quantized values (MatMulNBits); float tensors as INT8
    INT8 = "int8"
    INT4 = "int4"
    FP32 = "fp32"
    FP16 = "fp16"  # int8 weights as INT8, everything else (scales, activations, KV) in float16
    NATIVE_FP16 = "native-fp16"  # NATIVE's weights, float16 elsewhere

    @property
    def half(self) -> bool:
        """Whether activations, KV cache and logits are float16."""
        return self in (Precision.FP16, Precision.NATIVE_FP16)

    @property
    def weights(self) -> Precision:
        """How the weights are stored, whatever the float type around them."""
        return {Precision.FP16: Precision.INT8, Precision.NATIVE_FP16: Precision.NATIVE}.get(self, self)


class WeightSource(Protocol):
    """What the builder reads: a config, an architecture, and float32 tensors by GGUF name."""

    @property
    def config(self) -> ModelConfig: ...

    @property
    def architecture(self) -> Architecture: ...

    def tensor(self, name: str) -> np.ndarray: ...

    def native_tensor(self, name: str) -> NativeWeight | None: ...


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


def _quantize_in_slices(weight: np.ndarray, bits: int, rows: int = 4096) -> QuantizedWeight:
    """``quantize_blockwise`` a slice of rows at a time (its temporaries are several times
    the weight's size; a vocabulary-sized lm_head would otherwise dominate peak memory)."""
    if weight.shape[0] <= rows:
        return quantize_blockwise(weight, bits)
    parts = [
        quantize_blockwise(weight[start : start + rows], bits) for start in range(0, weight.shape[0], rows)
    ]
    zero_points = None
    if parts[0].zero_points is not None:
        zero_points = np.concatenate([p.zero_points for p in parts if p.zero_points is not None])
    return QuantizedWeight(
        np.concatenate([p.packed for p in parts]),
        np.concatenate([p.scales for p in parts]),
        zero_points,
        bits,
        weight.shape[0],
        weight.shape[1],
    )


def inverse_frequencies(
    head_dim: int, theta: float, *, linear_factor: float = 1.0, freq_factors: np.ndarray | None = None
) -> np.ndarray:
    """Rope inverse frequencies [head_dim / 2] in float32, computed as transformers does.

    ``freq_factors`` is llama.cpp's ``rope_freqs.weight`` (Llama 3.x's ``llama3`` scaling,
    stored as one divisor per frequency); ``linear_factor`` divides every frequency.
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponents)).astype(np.float32)
    if freq_factors is not None:
        inv_freq = (inv_freq / freq_factors.astype(np.float32)).astype(np.float32)
    if linear_factor != 1.0:
        inv_freq = (inv_freq / np.float32(linear_factor)).astype(np.float32)
    return inv_freq


def rotary_caches(inv_freq: np.ndarray, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables [max_positions, head_dim / 2] in float32."""
    positions = np.arange(max_positions, dtype=np.float32)
    freqs = np.outer(positions, inv_freq).astype(np.float32)
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


class _Graph:
    """Nodes and initializers; large initializers go straight to the external data file."""

    def __init__(self, precision: Precision, accuracy_level: int, data: BinaryIO, data_name: str) -> None:
        self.precision = precision.weights
        self.float_type: type[np.floating[Any]] = np.float16 if precision.half else np.float32
        self.accuracy_level = accuracy_level
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._data = data
        self._data_name = data_name
        self._offset = 0

    def init(self, name: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array)
        if array.nbytes < _INLINE_BYTES:
            self.initializers.append(numpy_helper.from_array(array, name))
            return name
        start = -(-self._offset // _ALIGN) * _ALIGN
        if start > self._offset:
            self._data.write(b"\0" * (start - self._offset))
        self._data.write(array.data)  # the buffer itself: no bytes copy
        self._offset = start + array.nbytes
        tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype))
        tensor.dims.extend(array.shape)
        tensor.data_location = TensorProto.EXTERNAL
        where = {"location": self._data_name, "offset": str(start), "length": str(array.nbytes)}
        for key, value in where.items():
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.initializers.append(tensor)
        return name

    def floats(self, name: str, array: np.ndarray) -> str:
        """An initializer in the graph's float type (float16 in the half builds)."""
        return self.init(name, np.asarray(array, dtype=self.float_type))

    def node(self, op: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs: Any) -> str:
        self.nodes.append(
            helper.make_node(op, inputs, outputs, name=outputs[0] + "/" + op, domain=domain, **attrs)
        )
        return outputs[0]

    def linear(
        self,
        name: str,
        x: str,
        weight: np.ndarray | NativeWeight,
        bias: np.ndarray | None = None,
        codes: str | None = None,
    ) -> str:
        """y = x @ weight.T (+ bias) for a float32 weight [out, in] or a GGUF one in its own bits
        (``codes``: the initializer already holding those bits, a tied embedding's)."""
        out = f"{name}/out"
        if isinstance(weight, NativeWeight):
            out = emit_native_linear(self, name, x, weight, self.accuracy_level, self.float_type, codes)
        elif self.precision is Precision.FP32:
            self.node("MatMul", [x, self.floats(f"{name}.weight", weight.T)], [out])
        else:
            q = _quantize_in_slices(weight, 4 if self.precision is Precision.INT4 else 8)
            inputs = [x, self.init(f"{name}.qweight", q.packed), self.floats(f"{name}.scales", q.scales)]
            if q.zero_points is not None:
                inputs.append(self.init(f"{name}.qzeros", q.zero_points))
            self.node(
                "MatMulNBits", inputs, [out], domain=MS_DOMAIN,
                K=q.k, N=q.n, bits=q.bits, block_size=BLOCK_SIZE, accuracy_level=self.accuracy_level,
            )  # fmt: skip
        if bias is None:
            return out
        return self.node("Add", [out, self.floats(f"{name}.bias", bias)], [f"{name}/biased"])

    def rms_norm(self, name: str, x: str, weight: np.ndarray, eps: float) -> str:
        return self.node(
            "SimplifiedLayerNormalization", [x, self.floats(f"{name}.weight", weight)], [f"{name}/out"],
            axis=-1, epsilon=eps, stash_type=1,
        )  # fmt: skip

    def skip_rms_norm(
        self, name: str, x: str, residual: str, weight: np.ndarray, eps: float
    ) -> tuple[str, str]:
        """(norm(x + residual), x + residual)."""
        norm, total = f"{name}/out", f"{name}/sum"
        self.node(
            "SkipSimplifiedLayerNormalization", [x, residual, self.floats(f"{name}.weight", weight)],
            [norm, "", "", total], domain=MS_DOMAIN, epsilon=eps,
        )  # fmt: skip
        return norm, total


class _Reader:
    """Reads tensors from the source and reports each name to ``on_tensor``."""

    def __init__(
        self, source: WeightSource, on_tensor: Callable[[str], None] | None, *, native: bool
    ) -> None:
        self._source = source
        self._on_tensor = on_tensor
        self._native = native

    def __call__(self, name: str) -> np.ndarray:
        array = self._source.tensor(name)
        if self._on_tensor is not None:
            self._on_tensor(name)
        return array

    def weight(self, name: str) -> np.ndarray | NativeWeight:
        """A linear layer's weight: in the file's own bits under ``Precision.NATIVE`` where its
        type has a mapping, else float32."""
        native = self._source.native_tensor(name) if self._native else None
        if native is None:
            return self(name)
        if self._on_tensor is not None:
            self._on_tensor(name)
        return native


def build_decoder(
    source: WeightSource,
    model_path: Path,
    *,
    precision: Precision = Precision.INT8,
    accuracy_level: int = 0,
    max_positions: int | None = None,
    on_tensor: Callable[[str], None] | None = None,
) -> None:
    """Write the decoder graph to ``model_path`` and its weights to ``model_path + '.data'``.

    ``on_tensor`` is called with each GGUF tensor name once it is read; an exception it
    raises stops the build (the caller removes the half-written files).
    """
    data_name = model_path.name + ".data"
    with (model_path.parent / data_name).open("wb") as data:
        g = _Graph(precision, accuracy_level, data, data_name)
        read = _Reader(source, on_tensor, native=precision.weights is Precision.NATIVE)
        _Builder(g, source.config, source.architecture, read).build(max_positions)
    model = _model_proto(g, source.config, TensorProto.FLOAT16 if precision.half else TensorProto.FLOAT)
    model_path.write_bytes(model.SerializeToString())


class _Builder:
    """The shared blocks of every family; the ``Architecture`` flags pick among them."""

    def __init__(self, g: _Graph, cfg: ModelConfig, arch: Architecture, read: _Reader) -> None:
        self.g, self.cfg, self.arch, self.read = g, cfg, arch, read

    def build(self, max_positions: int | None) -> None:
        g, cfg = self.g, self.cfg
        self._inputs()
        self._rotary(max_positions or cfg.context_length)
        hidden, table_codes = self._embedding()
        residual, pending = hidden, None
        for layer in range(cfg.num_layers):
            residual, pending = self._layer(layer, residual, pending)
        assert pending is not None
        # Only the last position's logits are ever used: slice before the final norm and lm_head.
        last = ["const.last_start", "const.last_end", "const.axis1"]
        g.node("Slice", [pending, *last], ["final/pending_last"])
        g.node("Slice", [residual, *last], ["final/resid_last"])
        final_weight = self.read("output_norm.weight")
        final, _ = g.skip_rms_norm(
            "final_norm", "final/pending_last", "final/resid_last", final_weight, cfg.rms_norm_eps
        )
        # Tied embeddings are read a second time rather than held through the whole build; in
        # the file's bits, the lm_head shares the lookup's codes.
        tied = cfg.tie_word_embeddings
        head = self.read.weight("token_embd.weight" if tied else "output.weight")
        g.node(
            "Identity", [g.linear("lm_head", final, head, codes=table_codes if tied else None)], ["logits"]
        )

    def _inputs(self) -> None:
        g = self.g
        g.init("const.one", np.array([1], dtype=np.int64))
        g.init("const.axis1", np.array([1], dtype=np.int64))
        g.init("const.last_start", np.array([-1], dtype=np.int64))
        g.init("const.last_end", np.array([np.iinfo(np.int64).max], dtype=np.int64))
        # seqlens_k = rowsum(mask) - 1 (int32); total_sequence_length = mask width (int32).
        g.node("ReduceSum", ["attention_mask", "const.axis1"], ["mask/rowsum"], keepdims=0)
        g.node("Sub", ["mask/rowsum", "const.one"], ["mask/seqlens_k_i64"])
        g.node("Cast", ["mask/seqlens_k_i64"], ["seqlens_k"], to=TensorProto.INT32)
        g.node("Shape", ["attention_mask"], ["mask/shape"])
        g.node("Gather", ["mask/shape", "const.one"], ["mask/total_i64"], axis=0)
        g.node("Cast", ["mask/total_i64"], ["total_sequence_length"], to=TensorProto.INT32)

    def _rotary(self, positions: int) -> None:
        cfg = self.cfg
        factors = self.read("rope_freqs.weight") if cfg.has_rope_freqs else None
        inv_freq = inverse_frequencies(
            cfg.head_dim, cfg.rope_theta, linear_factor=cfg.rope_linear_factor, freq_factors=factors
        )
        cos, sin = rotary_caches(inv_freq, positions)
        self.g.floats("cos_cache", cos)
        self.g.floats("sin_cache", sin)
        if cfg.rope_local_theta is not None and any(cfg.is_local(i) for i in range(cfg.num_layers)):
            cos, sin = rotary_caches(inverse_frequencies(cfg.head_dim, cfg.rope_local_theta), positions)
            self.g.floats("cos_cache_local", cos)
            self.g.floats("sin_cache_local", sin)

    def _embedding(self) -> tuple[str, str | None]:
        """The scaled embedding lookup, and the initializer of its codes where the table is in
        the file's bits (a tied lm_head reads them too)."""
        table = self.read.weight("token_embd.weight")
        codes = None
        if isinstance(table, NativeWeight):
            looked_up, codes = emit_native_lookup(
                self.g, "embed_tokens", "input_ids", table, self.g.float_type
            )
        else:
            looked_up = self._float_embedding(table)
        del table
        if not self.arch.scale_embeddings:
            return looked_up, codes
        g = self.g
        scale = g.floats("embed.scale", np.array(np.sqrt(self.cfg.hidden_size), dtype=np.float32))
        return g.node("Mul", [looked_up, scale], ["embed/scaled"]), codes

    def _float_embedding(self, embed: np.ndarray) -> str:
        g = self.g
        # Native keeps a float table's values exactly (float32). The half builds look up float16
        # rows: their activations are float16 anyway.
        if g.float_type is np.float16 or g.precision in (Precision.FP32, Precision.NATIVE):
            g.node("Gather", [g.floats("embed_tokens.weight", embed), "input_ids"], ["embed/out"])
        else:  # half the memory of float32; the rounding is far below int8's
            table = g.init("embed_tokens.weight_fp16", embed.astype(np.float16))
            g.node("Gather", [table, "input_ids"], ["embed/fp16"])
            g.node("Cast", ["embed/fp16"], ["embed/out"], to=TensorProto.FLOAT)
        return "embed/out"

    def _layer(self, i: int, residual: str, pending: str | None) -> tuple[str, str]:
        """One block. ``pending`` is the previous block's output not yet added to ``residual``;
        returns the new (residual, pending)."""
        g, cfg, arch, read = self.g, self.cfg, self.arch, self.read
        p, eps = f"blk.{i}", cfg.rms_norm_eps
        attn_norm = read(f"{p}.attn_norm.weight")
        if pending is None:
            x = g.rms_norm(f"{p}.attn_norm", residual, attn_norm, eps)
        else:
            x, residual = g.skip_rms_norm(f"{p}.attn_norm", pending, residual, attn_norm, eps)
        attn = g.linear(f"{p}.attn_output", self._attention(i, x), read.weight(f"{p}.attn_output.weight"))
        if arch.sandwich_norms:
            attn = g.rms_norm(f"{p}.post_attention_norm", attn, read(f"{p}.post_attention_norm.weight"), eps)
        x, residual = g.skip_rms_norm(f"{p}.ffn_norm", attn, residual, read(f"{p}.ffn_norm.weight"), eps)
        out = self._mlp(p, x)
        if arch.sandwich_norms:
            out = g.rms_norm(f"{p}.post_ffw_norm", out, read(f"{p}.post_ffw_norm.weight"), eps)
        return residual, out

    def _attention(self, i: int, x: str) -> str:
        g, cfg, arch, read = self.g, self.cfg, self.arch, self.read
        p = f"blk.{i}"
        weight: np.ndarray | NativeWeight
        if arch.fused_qkv:
            weight = read.weight(f"{p}.attn_qkv.weight")
        else:
            weight = stack_rows([read.weight(f"{p}.attn_{name}.weight") for name in ("q", "k", "v")])
        bias = None
        if arch.qkv_bias:
            bias = np.concatenate([read(f"{p}.attn_{name}.bias") for name in ("q", "k", "v")])
        qkv = g.linear(f"{p}.attn_qkv", x, weight, bias)
        if arch.qk_norm:
            q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
            split = g.init(f"{p}.qkv_split", np.array([q_size, kv_size, kv_size], dtype=np.int64))
            q, k, v = f"{p}/q", f"{p}/k", f"{p}/v"
            g.node("Split", [qkv, split], [q, k, v], axis=-1)
            q = self._head_norm(f"{p}.attn_q_norm", q, cfg.num_heads)
            k = self._head_norm(f"{p}.attn_k_norm", k, cfg.num_kv_heads)
            qkv_inputs = [q, k, v]
        else:
            qkv_inputs = [qkv, "", ""]
        local = cfg.is_local(i)
        suffix = "_local" if local and cfg.rope_local_theta is not None else ""
        caches = [f"cos_cache{suffix}", f"sin_cache{suffix}"]
        attrs: dict[str, Any] = {}
        if cfg.attention_scale is not None:
            attrs["scale"] = cfg.attention_scale
        out = f"{p}/attn"
        g.node(
            "GroupQueryAttention",
            [*qkv_inputs, f"past_key_values.{i}.key", f"past_key_values.{i}.value",
             "seqlens_k", "total_sequence_length", *caches],
            [out, f"present.{i}.key", f"present.{i}.value"],
            domain=MS_DOMAIN, num_heads=cfg.num_heads, kv_num_heads=cfg.num_kv_heads,
            do_rotary=1, rotary_interleaved=0, local_window_size=cfg.sliding_window if local else -1, **attrs,
        )  # fmt: skip
        return out

    def _head_norm(self, name: str, x: str, heads: int) -> str:
        """RMSNorm over each head of ``x`` [batch, seq, heads * head_dim]."""
        g = self.g
        shape = g.init(f"{name}.shape", np.array([0, 0, heads, self.cfg.head_dim], dtype=np.int64))
        g.node("Reshape", [x, shape], [f"{name}/heads"])
        normed = g.rms_norm(name, f"{name}/heads", self.read(f"{name}.weight"), self.cfg.rms_norm_eps)
        flat = g.init(f"{name}.flat", np.array([0, 0, heads * self.cfg.head_dim], dtype=np.int64))
        return g.node("Reshape", [normed, flat], [f"{name}/flat"])

    def _mlp(self, p: str, x: str) -> str:
        g, read = self.g, self.read
        # Gate and up read the same input: one product of their stacked rows, then a Split (at
        # decode, each node's dispatch costs about as much as a small product).
        both: np.ndarray | NativeWeight
        if self.arch.fused_gate_up:
            both = read.weight(f"{p}.ffn_up.weight")  # gate rows, then up rows
        else:
            both = stack_rows([read.weight(f"{p}.ffn_gate.weight"), read.weight(f"{p}.ffn_up.weight")])
        gate_up = g.linear(f"{p}.ffn_gate_up", x, both)
        del both
        size = self.cfg.intermediate_size
        gate, up = f"{p}/gate", f"{p}/up"
        split = g.init(f"{p}.gate_up_split", np.array([size, size], dtype=np.int64))
        g.node("Split", [gate_up, split], [gate, up], axis=-1)
        if self.arch.mlp is MLPKind.SWIGLU:
            g.node("Sigmoid", [gate], [f"{p}/gate_sigmoid"])
            act = g.node("Mul", [gate, f"{p}/gate_sigmoid"], [f"{p}/silu"])
        else:
            act = g.node("Gelu", [gate], [f"{p}/gelu"], approximate="tanh")
        g.node("Mul", [act, up], [f"{p}/mlp_in"])
        return g.linear(f"{p}.ffn_down", f"{p}/mlp_in", read.weight(f"{p}.ffn_down.weight"))


def _model_proto(g: _Graph, cfg: ModelConfig, float_type: int) -> onnx.ModelProto:
    kv_shape: list[str | int] = ["batch_size", cfg.num_kv_heads, "past_sequence_length", cfg.head_dim]
    present_shape: list[str | int] = ["batch_size", cfg.num_kv_heads, "total_sequence_length", cfg.head_dim]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info(
            "attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]
        ),
    ]
    outputs = [helper.make_tensor_value_info("logits", float_type, ["batch_size", 1, cfg.vocab_size])]
    for i in range(cfg.num_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", float_type, kv_shape))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", float_type, present_shape))
    graph = helper.make_graph(g.nodes, f"{cfg.architecture}_decoder", inputs, outputs, g.initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS_DOMAIN, 1)],
        producer_name="localchat-builder",
    )
    model.ir_version = 10
    return model
