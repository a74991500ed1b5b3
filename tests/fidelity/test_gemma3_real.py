"""Real weights of a second architecture: Gemma 3 270M (base, Q4_K_M), ours against transformers.

Our builder reads the GGUF (Q4_K, Q6_K, Q5_0, Q8_0 tensors dequantized by the ``gguf``
package) and builds fp32 and int8 graphs; transformers reads the same file. Prompts are
token ids as transformers' tokenizer encodes them from this GGUF (BOS first), so the check
is about the graph, not the text handling.

* fp32: the first 32 greedy tokens equal transformers' on every prompt;
* int8: teacher-forced top-1 predictions over prompt + reference continuation agree with
  fp32's on >= 90 % of positions (int8 greedy runs drift apart after a while, as the
  default model's do; the shared prefix lengths are printed, see ``-s``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.engine.models.gguf_source import GGUFSource
from service.engine.models.onnx_builder import Precision, build_decoder
from service.engine.runner import Runner
from tests.conftest import CACHE_DIR
from tests.fidelity.gemma3_gguf import fetch_gemma3_gguf

pytest.importorskip("torch")
pytest.importorskip("transformers")

from tests.fidelity import reference

pytestmark = [pytest.mark.fidelity, pytest.mark.slow]

GREEDY_TOKENS = 32
MIN_INT8_AGREEMENT = 0.9
PROMPTS = {  # transformers' encoding of the text with this GGUF's tokenizer
    "The capital of France is": [2, 818, 5279, 529, 7001, 563],
    "Water boils at a temperature of": [2, 17390, 104264, 657, 496, 4022, 529],
    "The largest planet in the solar system is": [2, 818, 7488, 13401, 528, 506, 10321, 1458, 563],
    "def fibonacci(n):": [2, 2063, 10779, 78113, 236769, 236749, 1473],
}


@pytest.fixture(scope="module")
def gemma3_gguf() -> Path:
    return fetch_gemma3_gguf(CACHE_DIR)


@pytest.fixture(scope="module")
def expected(gemma3_gguf: Path) -> dict[str, list[int]]:
    return {
        text: reference.reference_greedy(gemma3_gguf, ids, GREEDY_TOKENS) for text, ids in PROMPTS.items()
    }


def _build(gguf_path: Path, directory: Path, precision: Precision) -> Path:
    directory.mkdir()
    model_file = directory / "model.onnx"
    level = 4 if precision is Precision.INT8 else 0
    build_decoder(
        GGUFSource(gguf_path), model_file, precision=precision, accuracy_level=level, max_positions=1024
    )
    return model_file


@pytest.fixture(scope="module")
def fp32_model(gemma3_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(gemma3_gguf, tmp_path_factory.mktemp("gemma3") / "fp32", Precision.FP32)


def _greedy(model_file: Path, prompt: list[int]) -> list[int]:
    runner = Runner(model_file, device="cpu", threads=2, slots=1, max_len=len(prompt) + GREEDY_TOKENS)
    out = [int(np.argmax(runner.forward(0, np.array([prompt], dtype=np.int64), [0])[0]))]
    while len(out) < GREEDY_TOKENS:
        logits = runner.forward(0, np.array([[out[-1]]], dtype=np.int64), [len(prompt) + len(out) - 1])
        out.append(int(np.argmax(logits[0])))
    return out


def _top1(model_file: Path, ids: list[int]) -> np.ndarray:
    runner = Runner(model_file, device="cpu", threads=2, slots=1, max_len=len(ids))
    return np.array([
        int(np.argmax(runner.forward(0, np.array([[token]], dtype=np.int64), [position])[0]))
        for position, token in enumerate(ids)
    ])  # fmt: skip


def test_fp32_greedy_equals_transformers(fp32_model: Path, expected: dict[str, list[int]]) -> None:
    """32 greedy tokens per prompt, identical to transformers reading the same GGUF."""
    for text, ids in PROMPTS.items():
        assert _greedy(fp32_model, ids) == expected[text], text


def test_int8_follows_fp32(
    fp32_model: Path, gemma3_gguf: Path, expected: dict[str, list[int]], tmp_path: Path
) -> None:
    """int8 teacher-forced top-1 agrees with fp32 on >= 90 % of positions."""
    int8_model = _build(gemma3_gguf, tmp_path / "int8", Precision.INT8)
    same, total = 0, 0
    for text, ids in PROMPTS.items():
        sequence = ids + expected[text]
        same += int(np.sum(_top1(int8_model, sequence) == _top1(fp32_model, sequence)))
        total += len(sequence)
        greedy = _greedy(int8_model, ids)
        prefix = next((i for i, (a, b) in enumerate(zip(greedy, expected[text], strict=True)) if a != b), 32)
        print(f"\nint8 greedy: first {prefix} of 32 tokens equal to transformers' for {text!r}")
    print(f"int8 vs fp32 teacher-forced top-1: {same / total:.1%} of {total} positions")
    assert same / total >= MIN_INT8_AGREEMENT
