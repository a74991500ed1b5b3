"""A directory exported by optimum loads and decodes exactly like the torch model it came from.

Builds a tiny random Llama locally (no hub), exports it with optimum's ONNX exporter,
and checks our runner's "optimum" path (per-step cache gather/scatter, position_ids)
against the torch model's own greedy decoding, alone and batched. Skipped unless the
ONNX exporter (package ``optimum-onnx``) is installed.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.engine.models.registry import PreparedModel, describe_dir
from service.engine.runner import Runner
from service.engine.tokenizer import ChatTokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
exporters = pytest.importorskip("optimum.exporters.onnx")

NEW_TOKENS = 16
MAX_LEN = 128
PROMPTS = (
    "The quick brown fox jumps over the lazy dog because",
    "Hello",
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tiny_model: PreparedModel) -> tuple[Any, Path]:
    """The torch model and the optimum export of it (with the SmolLM2 tokenizer files)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = tmp_path_factory.mktemp("optimum")
    config = transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_LEN,
        # Larger than the default 0.02, so greedy picks win by clear margins (no near-ties
        # for float rounding to flip).
        initializer_range=0.2,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    source = work / "hf"
    output = work / "onnx"
    with warnings.catch_warnings():
        # The exporter traces the model: TracerWarnings and deprecations are expected here.
        warnings.simplefilter("ignore")
        model.save_pretrained(source)
        exporters.main_export(str(source), output=output, task="text-generation-with-past")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model.directory / name, output / name)
    return model, output


def torch_greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation by full recomputation (no cache): the simplest possible reference."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False).logits
            ids.append(int(torch.argmax(logits[0, -1]).item()))
    return ids[len(prompt) :]


def prompt_ids(directory: Path) -> list[list[int]]:
    tokenizer = ChatTokenizer.from_dir(directory)
    return [tokenizer.encode(text) for text in PROMPTS]


def test_describe_dir_sees_an_optimum_graph(exported: tuple[Any, Path]) -> None:
    _, directory = exported
    prepared = describe_dir("tiny-optimum", directory)
    assert prepared.style == "optimum"
    assert prepared.model_file == directory / "model.onnx"
    assert prepared.context_length == MAX_LEN


def test_single_sequence_matches_torch_greedy(exported: tuple[Any, Path]) -> None:
    model, directory = exported
    prepared = describe_dir("tiny-optimum", directory)
    runner = Runner(
        prepared.model_file, device="cpu", threads=2, slots=2, max_len=MAX_LEN, style=prepared.style
    )
    for prompt in prompt_ids(directory):
        expected = torch_greedy(model, prompt, NEW_TOKENS)
        logits = runner.forward(0, np.array([prompt], dtype=np.int64), [0])
        got = [int(np.argmax(logits[0]))]
        while len(got) < NEW_TOKENS:
            past = len(prompt) + len(got) - 1
            logits = runner.forward(0, np.array([[got[-1]]], dtype=np.int64), [past])
            got.append(int(np.argmax(logits[0])))
        assert got == expected, f"prompt of {len(prompt)} tokens"


def test_batched_decode_matches_single_sequences(exported: tuple[Any, Path]) -> None:
    model, directory = exported
    prepared = describe_dir("tiny-optimum", directory)
    prompts = prompt_ids(directory)
    assert len(prompts[0]) != len(prompts[1])
    expected = [torch_greedy(model, prompt, NEW_TOKENS) for prompt in prompts]

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
