"""Our ONNX builds of the default model against transformers reading the same GGUF.

* fp32: greedy decoding through our runner gives exactly transformers' tokens.
* native (the file's own bits) computed in fp32 (accuracy level 1): the same as fp32
  (>= 99 % teacher-forced, transformers' greedy tokens); as built (level 4): >= 92 %;
* int8: teacher-forced top-1 predictions agree with fp32 on >= 95 % of positions of
  natural text (int4's agreement is printed for information; see with ``-s``).

Our side is fed token ids, never text, through the runner directly: a difference points
at the conversion or the runner. Teacher forcing runs one token per step (decode mode),
the mode generation itself uses after the prompt.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from service.engine.models.onnx_builder import Precision
from service.engine.models.prepare import prepare_gguf
from service.engine.models.registry import PreparedModel, parse_model_arg, resolve
from service.engine.runner import Runner
from service.engine.tokenizer import ChatMessage, ChatTokenizer
from tests.conftest import CACHE_DIR

pytest.importorskip("torch")
pytest.importorskip("transformers")

# Needs torch, so only after the skips.
from tests.fidelity import reference

pytestmark = pytest.mark.fidelity

GREEDY_TOKENS = 32
MIN_INT8_AGREEMENT = 0.95
MIN_NATIVE_AGREEMENT = 0.92

GREEDY_CHATS: tuple[list[ChatMessage], ...] = (
    [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    [{"role": "user", "content": "Write a short poem about the sea."}],
    [
        {"role": "user", "content": "I have two apples and buy three more."},
        {"role": "assistant", "content": "Then you have five apples."},
        {"role": "user", "content": "And if I eat one of them, how many are left? Explain."},
    ],
)

PROSE_QUESTION = "Can you tell me how bread is made?"
PROSE_REPLY = (
    "Bread is one of the oldest prepared foods, and the basic method has changed surprisingly "
    "little over thousands of years. A baker starts by mixing flour with water and a little salt. "
    "Yeast is added to the dough, either as a dried powder from a packet or as a sourdough starter "
    "that has been kept alive and fed for days or even years. The dough is then kneaded, which means "
    "it is pressed, folded and stretched over and over again until it becomes smooth and elastic. "
    "Kneading develops gluten, a network of proteins that traps the gas the yeast produces as it "
    "feeds on the sugars in the flour. After kneading, the dough is left to rest in a warm place, "
    "where it slowly rises and roughly doubles in size. It is then shaped into loaves or rolls, "
    "allowed to rise a second time, and finally baked in a hot oven. The heat makes the gas expand "
    "quickly, sets the structure of the crumb and browns the outside into a crisp crust. Once the "
    "bread has cooled for a while, it can be sliced and enjoyed with butter, cheese or soup."
)


def _prepare(precision: Precision) -> PreparedModel:
    return resolve(parse_model_arg("default"), CACHE_DIR, precision=precision, progress=False)


@pytest.fixture(scope="session")
def fp32_model() -> PreparedModel:
    return _prepare(Precision.FP32)


@pytest.fixture(scope="session")
def int8_model() -> PreparedModel:
    return _prepare(Precision.INT8)


@pytest.fixture(scope="session")
def int4_model() -> PreparedModel:
    return _prepare(Precision.INT4)


@pytest.fixture(scope="session")
def chat_tokenizer(fp32_model: PreparedModel) -> ChatTokenizer:
    return ChatTokenizer.from_dir(fp32_model.directory)


@pytest.fixture(scope="session")
def prose_ids(chat_tokenizer: ChatTokenizer) -> list[int]:
    """A conversation whose assistant reply is a paragraph of English prose (~300 tokens)."""
    messages: list[ChatMessage] = [
        {"role": "user", "content": PROSE_QUESTION},
        {"role": "assistant", "content": PROSE_REPLY},
    ]
    return chat_tokenizer.encode(chat_tokenizer.render(messages, add_generation_prompt=False))


def _runner(model: PreparedModel, max_len: int) -> Runner:
    return Runner(model.model_file, device="cpu", threads=2, slots=1, max_len=max_len, style=model.style)


def greedy(model: PreparedModel, prompt: list[int], n: int) -> list[int]:
    """``n`` argmax tokens: the prompt prefilled in one chunk, then one decode step per token."""
    runner = _runner(model, len(prompt) + n)
    logits = runner.forward(0, np.array([prompt], dtype=np.int64), [0])
    out = [int(np.argmax(logits[0]))]
    while len(out) < n:
        past = len(prompt) + len(out) - 1
        logits = runner.forward(0, np.array([[out[-1]]], dtype=np.int64), [past])
        out.append(int(np.argmax(logits[0])))
    return out


def teacher_forced_top1(model: PreparedModel, ids: list[int]) -> npt.NDArray[np.int64]:
    """Row i: the argmax prediction after ids[: i + 1], each position computed in decode mode."""
    runner = _runner(model, len(ids))
    top1 = np.empty(len(ids), dtype=np.int64)
    for position, token in enumerate(ids):
        logits = runner.forward(0, np.array([[token]], dtype=np.int64), [position])
        top1[position] = int(np.argmax(logits[0]))
    return top1


@pytest.fixture(scope="session")
def fp32_top1(fp32_model: PreparedModel, prose_ids: list[int]) -> npt.NDArray[np.int64]:
    return teacher_forced_top1(fp32_model, prose_ids)


@pytest.mark.parametrize("chat", range(len(GREEDY_CHATS)))
def test_fp32_greedy_matches_transformers(
    chat: int, fp32_model: PreparedModel, chat_tokenizer: ChatTokenizer, smollm2_gguf: Path
) -> None:
    prompt = chat_tokenizer.prompt_ids(GREEDY_CHATS[chat])
    expected = reference.reference_greedy(smollm2_gguf, prompt, GREEDY_TOKENS)
    got = greedy(fp32_model, prompt, GREEDY_TOKENS)
    assert got == expected, (
        f"prompt of {len(prompt)} tokens:\n"
        f"  ours:         {chat_tokenizer.decode(got)!r}\n"
        f"  transformers: {chat_tokenizer.decode(expected)!r}"
    )


def test_fp32_teacher_forced_matches_transformers(
    fp32_top1: npt.NDArray[np.int64], prose_ids: list[int], smollm2_gguf: Path
) -> None:
    expected = reference.reference_logits(smollm2_gguf, prose_ids).argmax(axis=-1)
    agreement = float(np.mean(fp32_top1 == expected))
    print(f"\nfp32 vs transformers: top-1 agreement {agreement:.2%} over {len(prose_ids)} positions")
    assert agreement >= 0.99


def _agreement(
    model: PreparedModel, prose_ids: list[int], fp32_top1: npt.NDArray[np.int64], name: str
) -> float:
    top1 = teacher_forced_top1(model, prose_ids)
    agreement = float(np.mean(top1 == fp32_top1))
    print(f"\n{name} vs fp32: top-1 agreement {agreement:.2%} over {len(prose_ids)} positions")
    return agreement


def test_int8_agrees_with_fp32(
    int8_model: PreparedModel, prose_ids: list[int], fp32_top1: npt.NDArray[np.int64]
) -> None:
    assert len(prose_ids) >= 200
    assert _agreement(int8_model, prose_ids, fp32_top1, "int8") >= MIN_INT8_AGREEMENT


def test_int4_agreement_is_reported(
    int4_model: PreparedModel, prose_ids: list[int], fp32_top1: npt.NDArray[np.int64]
) -> None:
    """For information only: int4 loses more, and no threshold is promised for it."""
    agreement = _agreement(int4_model, prose_ids, fp32_top1, "int4")
    assert 0.0 <= agreement <= 1.0


@pytest.fixture(scope="session")
def native_model() -> PreparedModel:
    """The native build as served: the file's own bits at accuracy level 4 (int8 activations)."""
    return _prepare(Precision.NATIVE)


@pytest.fixture(scope="session")
def native_exact_model(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> PreparedModel:
    """The file's own bits computed in fp32 (accuracy level 1): only float rounding differs from fp32."""
    out = tmp_path_factory.mktemp("native-exact") / "model"
    prepare_gguf(smollm2_gguf, out, precision=Precision.NATIVE, progress=False, accuracy_level=1)
    return resolve(parse_model_arg(str(out)), out.parent, precision=Precision.NATIVE, progress=False)


EXACT_POSITIONS = 100  # level 1 runs MatMulNBits' slow fp32 kernel: ~0.1 s a position here


def test_native_in_fp32_is_the_file(
    native_exact_model: PreparedModel, prose_ids: list[int], fp32_top1: npt.NDArray[np.int64]
) -> None:
    """The file's bits computed in fp32 predict what the fp32 build predicts (over the first
    ``EXACT_POSITIONS`` positions of the prose; the greedy runs below check whole answers)."""
    ids = prose_ids[:EXACT_POSITIONS]
    assert _agreement(native_exact_model, ids, fp32_top1[:EXACT_POSITIONS], "native (level 1)") >= 0.99


@pytest.mark.parametrize("chat", range(len(GREEDY_CHATS)))
def test_native_in_fp32_greedy_matches_transformers(
    chat: int, native_exact_model: PreparedModel, chat_tokenizer: ChatTokenizer, smollm2_gguf: Path
) -> None:
    prompt = chat_tokenizer.prompt_ids(GREEDY_CHATS[chat])
    expected = reference.reference_greedy(smollm2_gguf, prompt, GREEDY_TOKENS)
    assert greedy(native_exact_model, prompt, GREEDY_TOKENS) == expected


def test_native_agreement_is_reported(
    native_model: PreparedModel, prose_ids: list[int], fp32_top1: npt.NDArray[np.int64]
) -> None:
    """At level 4 the activations are quantized to int8 per block; the agreement is printed (``-s``)."""
    assert _agreement(native_model, prose_ids, fp32_top1, "native (level 4)") >= MIN_NATIVE_AGREEMENT
