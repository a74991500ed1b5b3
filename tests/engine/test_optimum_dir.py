"""A directory exported by optimum loads and decodes exactly like the torch model it came from.

A tiny random Llama is built locally (no hub) and exported with optimum's ONNX exporter in a
child process (``optimum_export.py``) that uses the optimum side-install: ``optimum-onnx`` pins a
``transformers`` older than the fidelity tests' one, so they never share a process. Our runner's
"optimum" path (per-step cache gather/scatter, position_ids) must then reproduce torch's greedy
tokens, alone and batched. Skipped only where the side-install is missing (``scripts/test`` makes
it; see ``OPTIMUM_SIDE``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from service.engine.models.registry import PreparedModel, describe_dir
from service.engine.runner import Runner
from service.engine.tokenizer import ChatTokenizer
from tests.engine.optimum_export import MAX_LEN, NEW_TOKENS

REPO_ROOT = Path(__file__).resolve().parents[2]
# transformers 4.57, optimum 2.1 and optimum-onnx 0.1, installed with --no-deps --target here.
OPTIMUM_SIDE = REPO_ROOT / ".venv" / "optimum-side"
EXPORT_SCRIPT = Path(__file__).with_name("optimum_export.py")
PROMPTS = (
    "The quick brown fox jumps over the lazy dog because",
    "Hello",
)


@pytest.fixture(scope="module")
def exported(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: PreparedModel
) -> tuple[list[list[int]], Path]:
    """The prompts' torch continuations, and the optimum export (with the SmolLM2 tokenizer files)."""
    if not (OPTIMUM_SIDE / "optimum" / "exporters" / "onnx").is_dir():
        pytest.skip(f"the optimum side-install is missing ({OPTIMUM_SIDE}; scripts/test makes it)")
    pytest.importorskip("torch")  # the exporter traces a torch model (the fidelity extra)
    work = tmp_path_factory.mktemp("optimum")
    tokenizer = ChatTokenizer.from_dir(tiny_model.directory)
    prompts = [tokenizer.encode(text) for text in PROMPTS]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(OPTIMUM_SIDE), str(REPO_ROOT)])}
    done = subprocess.run(
        [sys.executable, str(EXPORT_SCRIPT), str(work)],
        input=json.dumps(prompts),
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    reference = json.loads((work / "reference.json").read_text())
    assert reference["transformers"].startswith("4."), reference  # the side-install's, not the venv's
    output = work / "onnx"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model.directory / name, output / name)
    return reference["continuations"], output


def prompt_ids(directory: Path) -> list[list[int]]:
    tokenizer = ChatTokenizer.from_dir(directory)
    return [tokenizer.encode(text) for text in PROMPTS]


def test_describe_dir_sees_an_optimum_graph(exported: tuple[list[list[int]], Path]) -> None:
    _, directory = exported
    prepared = describe_dir("tiny-optimum", directory)
    assert prepared.style == "optimum"
    assert prepared.model_file == directory / "model.onnx"
    assert prepared.context_length == MAX_LEN


def test_single_sequence_matches_torch_greedy(exported: tuple[list[list[int]], Path]) -> None:
    continuations, directory = exported
    prepared = describe_dir("tiny-optimum", directory)
    runner = Runner(
        prepared.model_file, device="cpu", threads=2, slots=2, max_len=MAX_LEN, style=prepared.style
    )
    for prompt, expected in zip(prompt_ids(directory), continuations, strict=True):
        logits = runner.forward(0, np.array([prompt], dtype=np.int64), [0])
        got = [int(np.argmax(logits[0]))]
        while len(got) < NEW_TOKENS:
            past = len(prompt) + len(got) - 1
            logits = runner.forward(0, np.array([[got[-1]]], dtype=np.int64), [past])
            got.append(int(np.argmax(logits[0])))
        assert got == expected, f"prompt of {len(prompt)} tokens"


def test_batched_decode_matches_single_sequences(exported: tuple[list[list[int]], Path]) -> None:
    expected, directory = exported
    prepared = describe_dir("tiny-optimum", directory)
    prompts = prompt_ids(directory)
    assert len(prompts[0]) != len(prompts[1])

    runner = Runner(
        prepared.model_file, device="cpu", threads=2, slots=3, max_len=MAX_LEN, style=prepared.style
    )
    # Slot 0 is a bystander: the batch runs over slots 1 and 2, so a wrong slot offset shows.
    generated: list[list[int]] = []
    for slot, prompt in enumerate(prompts, start=1):
        logits = runner.forward(slot, np.array([prompt], dtype=np.int64), [0])
        generated.append([int(np.argmax(logits[0]))])
    while len(generated[0]) < NEW_TOKENS:
        tokens = np.array([[g[-1]] for g in generated], dtype=np.int64)
        past = [len(p) + len(g) - 1 for p, g in zip(prompts, generated, strict=True)]
        logits = runner.forward(1, tokens, past)
        for row, g in enumerate(generated):
            g.append(int(np.argmax(logits[row])))
    assert generated == expected
