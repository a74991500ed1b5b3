"""What differs between the decoder families we build, stated as data.

Every family here is a pre-norm transformer decoder with rotary attention and a gated MLP; an
``Architecture`` says only how a family departs from that shape. The graph builder
(:mod:`service.engine.models.onnx_builder`) reads these flags; it has no per-family code.

Tensor names are llama.cpp's (``blk.N.attn_q.weight``, ...), the same in every family.
Norm weights are used as stored: llama.cpp's converter already adds Gemma's ``1 +`` to
every Gemma norm weight (q/k norms included), so no family needs an offset here.
Facts that llama.cpp fixes in code rather than in the file (Gemma 3's 5:1 local/global
layer pattern and its local rope base) are stated here, as llama.cpp states them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class MLPKind(StrEnum):
    SWIGLU = "swiglu"  # silu(gate) * up
    GEGLU_TANH = "geglu_tanh"  # gelu_tanh(gate) * up


@dataclass(frozen=True, slots=True)
class Architecture:
    """One GGUF ``general.architecture`` as the builder sees it."""

    name: str
    # llama.cpp's converter permutes the q/k rows of the llama family (only) for its
    # interleaved rope; the builder undoes it to use the half-split layout.
    unpermute_qk: bool = False
    qkv_bias: bool = False
    # q, k and v stored as one matrix (``attn_qkv``), gate and up as one (``ffn_up``, gate first).
    fused_qkv: bool = False
    fused_gate_up: bool = False
    # RMSNorm over each head of q and k (weights ``attn_q_norm``/``attn_k_norm``) before rope.
    qk_norm: bool = False
    # Norms of the attention and MLP outputs too (``post_attention_norm``, ``post_ffw_norm``).
    sandwich_norms: bool = False
    mlp: MLPKind = MLPKind.SWIGLU
    # Embeddings multiplied by sqrt(hidden size) before the first layer.
    scale_embeddings: bool = False
    # Layer i attends to a sliding window unless (i + 1) % pattern == 0 (0: every layer global).
    sliding_window_pattern: int = 0
    # Rope base of the sliding-window layers when it differs from the global one.
    local_rope_base: float | None = None
    # onnxruntime-genai's ``model.type`` in genai_config.json.
    genai_type: str = "llama"

    def layer_tensors(self) -> tuple[str, ...]:
        """The per-layer tensor names (without ``blk.N.``) a file of this family must hold."""
        names = ["attn_norm.weight"]
        qkv = ["attn_qkv.weight"] if self.fused_qkv else ["attn_q.weight", "attn_k.weight", "attn_v.weight"]
        names += qkv
        names += ["attn_output.weight", "ffn_norm.weight"]
        names += [] if self.fused_gate_up else ["ffn_gate.weight"]
        names += ["ffn_up.weight", "ffn_down.weight"]
        if self.qkv_bias:
            names += ["attn_q.bias", "attn_k.bias", "attn_v.bias"]
        if self.qk_norm:
            names += ["attn_q_norm.weight", "attn_k_norm.weight"]
        if self.sandwich_norms:
            names += ["post_attention_norm.weight", "post_ffw_norm.weight"]
        return tuple(names)


ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        Architecture("llama", unpermute_qk=True),
        Architecture("qwen2", qkv_bias=True, genai_type="qwen2"),
        Architecture("qwen3", qk_norm=True, genai_type="qwen3"),
        Architecture("phi3", fused_qkv=True, fused_gate_up=True, genai_type="phi3"),
        Architecture(
            "gemma3",
            qk_norm=True,
            sandwich_norms=True,
            mlp=MLPKind.GEGLU_TANH,
            scale_embeddings=True,
            sliding_window_pattern=6,
            local_rope_base=10000.0,
            genai_type="gemma3_text",
        ),
    )
}
