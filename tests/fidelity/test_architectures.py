"""Every supported architecture, built by our builder at fp32, against transformers.

For each family a tiny random-weight GGUF is written with the family's own tensor names
and metadata keys (tests/engine/tiny_archs.py), mixing quantization types as downloaded
files do (one for the attention matrices, another for the rest, F32 norms and biases;
F32, F16, Q8_0 and Q4_0 all appear), with the first tokens of the real SmolLM2 vocabulary. transformers reads
the same file (``from_pretrained(dir, gguf_file=...)``) and is the reference for all of
them: it reads llama, qwen2, qwen3, gemma3 and phi3 GGUFs, so no numpy reference is needed.

Where transformers' GGUF loader does not take a value from the file, the value is passed
to it explicitly, as llama.cpp defines it (see ``REFERENCE_OVERRIDES``).

Checked: greedy tokens identical over 32 steps (prompt prefilled in one chunk, then one
token per step on the KV cache), and the last prompt position's logits within
``LOGITS_ATOL``, also when the prompt is prefilled in two chunks (past + several new
tokens: the case where a sliding window and a cache meet).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.engine.models.onnx_builder import Precision
from service.engine.models.prepare import prepare_gguf
from service.engine.runner import Runner
from tests.engine.tiny_archs import TINY_ARCHS, QType, write_tiny_arch_gguf

pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.fidelity import reference

pytestmark = pytest.mark.fidelity

GREEDY_TOKENS = 32
# The first 2048 of SmolLM2's tokens and their merges: transformers parses a full 49k vocabulary
# for seconds on every load, and the graph's fidelity does not depend on the vocabulary's size.
VOCAB_LIMIT = 2048
PROMPT_TOKENS = 40  # longer than Gemma's tiny window (8) and Llama 3's tiny original context (64) / 4
# fp32 on both sides: differences are summation order only. Logits here span about +-20.
LOGITS_ATOL = 1e-3

_LLAMA3 = TINY_ARCHS["llama3"]
assert _LLAMA3.llama3_rope is not None
REFERENCE_OVERRIDES: dict[str, dict[str, Any]] = {
    # transformers ignores llama.cpp's rope_freqs.weight: give it the llama3 rope parameters
    # the tensor was computed from (tiny_archs.llama3_rope_factors).
    "llama3": {
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": _LLAMA3.rope_base,
            "factor": _LLAMA3.llama3_rope[0],
            "low_freq_factor": _LLAMA3.llama3_rope[1],
            "high_freq_factor": _LLAMA3.llama3_rope[2],
            "original_max_position_embeddings": _LLAMA3.llama3_rope[3],
        }
    },
    # transformers' qwen3 GGUF mapping drops attention.key_length (it assumes 128).
    "qwen3": {"head_dim": TINY_ARCHS["qwen3"].head_dim},
    # Gemma 3 GGUFs do not carry query_pre_attn_scalar; llama.cpp uses head_dim (except 27B).
    "gemma3": {"query_pre_attn_scalar": TINY_ARCHS["gemma3"].head_dim},
}

CASES: dict[str, tuple[QType, QType]] = {  # (attention matrices, other matrices)
    "llama": (QType.Q4_0, QType.F16),
    "llama3": (QType.Q8_0, QType.F32),
    "qwen2": (QType.F16, QType.Q8_0),
    "phi3": (QType.Q8_0, QType.Q4_0),
    "qwen3": (QType.Q4_0, QType.Q8_0),
    "gemma3": (QType.Q8_0, QType.Q4_0),
}


@pytest.fixture(scope="module")
def prompt() -> list[int]:
    return [int(i) for i in np.random.default_rng(7).integers(100, VOCAB_LIMIT, PROMPT_TOKENS)]


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Callable[[str], tuple[Path, Path]]:
    """``build(name)``: (GGUF path, our fp32 model.onnx), written and built once per module."""
    built: dict[str, tuple[Path, Path]] = {}

    def get(name: str) -> tuple[Path, Path]:
        if name not in built:
            work = tmp_path_factory.mktemp(name)
            spec, qtypes = TINY_ARCHS[name], CASES[name]
            gguf_path = write_tiny_arch_gguf(
                work / f"{name}.gguf", smollm2_gguf, spec, *qtypes, vocab_limit=VOCAB_LIMIT
            )
            directory = prepare_gguf(gguf_path, work / "model", precision=Precision.FP32, progress=False)
            built[name] = gguf_path, directory / "model.onnx"
        return built[name]

    return get


def _runner(model_file: Path, max_len: int) -> Runner:
    return Runner(model_file, device="cpu", threads=2, slots=1, max_len=max_len)


def _greedy(model_file: Path, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    runner = _runner(model_file, len(prompt) + n)
    logits = runner.forward(0, np.array([prompt], dtype=np.int64), [0]).copy()
    out = [int(np.argmax(logits[0]))]
    while len(out) < n:
        step = runner.forward(0, np.array([[out[-1]]], dtype=np.int64), [len(prompt) + len(out) - 1])
        out.append(int(np.argmax(step[0])))
    return out, logits[0]


def _chunked_last_logits(model_file: Path, prompt: list[int], first: int) -> np.ndarray:
    runner = _runner(model_file, len(prompt))
    runner.forward(0, np.array([prompt[:first]], dtype=np.int64), [0])
    return runner.forward(0, np.array([prompt[first:]], dtype=np.int64), [first])[0].copy()


@pytest.mark.parametrize("name", list(CASES))
def test_fp32_build_computes_what_transformers_computes(
    name: str, build: Callable[[str], tuple[Path, Path]], prompt: list[int]
) -> None:
    """Greedy tokens equal over 32 steps; last logits within LOGITS_ATOL (whole and chunked prefill)."""
    gguf_path, model_file = build(name)
    overrides = REFERENCE_OVERRIDES.get(name)
    expected_tokens = reference.reference_greedy(gguf_path, prompt, GREEDY_TOKENS, overrides)
    expected_logits = reference.reference_logits(gguf_path, prompt, overrides)[-1]
    tokens, logits = _greedy(model_file, prompt, GREEDY_TOKENS)
    assert tokens == expected_tokens
    assert np.abs(logits - expected_logits).max() <= LOGITS_ATOL
    chunked = _chunked_last_logits(model_file, prompt, first=PROMPT_TOKENS - 13)
    assert np.abs(chunked - expected_logits).max() <= LOGITS_ATOL
    print(f"\n{name}: max |logit difference| {np.abs(logits - expected_logits).max():.2e}")


def test_llama3_rope_scaling_changes_the_result(
    build: Callable[[str], tuple[Path, Path]], prompt: list[int]
) -> None:
    """The reference without llama3 scaling disagrees with our build: the scaling is really applied."""
    gguf_path, model_file = build("llama3")
    _, logits = _greedy(model_file, prompt, 1)
    unscaled = reference.reference_logits(gguf_path, prompt)[-1]
    assert np.abs(logits - unscaled).max() > 100 * LOGITS_ATOL
