"""The device KV pool (``OrtValue`` memory, slot moves by a copy graph) runs here on device "cpu":
the same code as on CUDA but the device string. It must decode exactly as the host pool does,
and copy, swap and release must keep each chat's cache its own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from service.config import EngineSettings
from service.engine.loader import kv_slots
from service.engine.models.onnx_builder import Precision
from service.engine.models.registry import PreparedModel
from service.engine.runner import Runner, choose_precision, resolve_device
from service.errors import ModelError

PROMPTS = [[1, 520, 33, 77, 19, 8, 4000], [1, 99, 1000, 4, 2001]]
STEPS = 12


def _runner(model: PreparedModel, pool: str, slots: int = 4) -> Runner:
    return Runner(model.model_file, device="cpu", threads=1, slots=slots, max_len=64, kv_pool=pool)  # type: ignore[arg-type]


def _decode(runner: Runner, steps: int = STEPS) -> list[list[int]]:
    """Prefill both prompts into slots 0 and 1, then decode them together, greedily."""
    out: list[list[int]] = []
    for slot, prompt in enumerate(PROMPTS):
        out.append([int(runner.forward(slot, np.array([prompt]), [0])[0].argmax())])
    lengths = [len(p) for p in PROMPTS]
    for _ in range(steps):
        logits = runner.forward(0, np.array([[o[-1]] for o in out]), lengths)
        for b in range(2):
            out[b].append(int(logits[b].argmax()))
            lengths[b] += 1
    return out


def _next(runner: Runner, slot: int, token: int, length: int) -> np.ndarray:
    return runner.forward(slot, np.array([[token]]), [length])[0].copy()


def test_device_pool_decodes_as_the_host_pool(tiny_model: PreparedModel) -> None:
    host, device = _runner(tiny_model, "host"), _runner(tiny_model, "device")
    assert (host.kv_pool, device.kv_pool) == ("host", "device")
    assert _decode(device) == _decode(host)


def test_copy_swap_and_release_on_the_device_pool(tiny_model: PreparedModel) -> None:
    runner = _runner(tiny_model, "device")
    tokens = _decode(runner, steps=4)
    lengths = [len(p) + 4 for p in PROMPTS]
    expected = [_next(runner, b, tokens[b][-1], lengths[b]) for b in range(2)]
    # The step just run wrote position `lengths[b]`; the comparisons below rerun the same step,
    # which rewrites that same position with the same values.
    runner.copy_slot(0, 2, lengths[0])
    np.testing.assert_array_equal(_next(runner, 2, tokens[0][-1], lengths[0]), expected[0])
    runner.swap_slots(0, 1, lengths[0], lengths[1])
    np.testing.assert_array_equal(_next(runner, 1, tokens[0][-1], lengths[0]), expected[0])
    np.testing.assert_array_equal(_next(runner, 0, tokens[1][-1], lengths[1]), expected[1])
    runner.release_slot(2)  # then reused by a fresh prefill, which must not see the old cache
    fresh = _runner(tiny_model, "device")
    prompt = PROMPTS[1]
    np.testing.assert_array_equal(
        runner.forward(2, np.array([prompt]), [0])[0], fresh.forward(0, np.array([prompt]), [0])[0]
    )


def test_device_choice_without_a_cuda_provider(tiny_model: PreparedModel) -> None:
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider: the CPU-only answers do not apply")
    assert resolve_device("auto") == "cpu"
    assert choose_precision("auto", "auto") is Precision.NATIVE
    assert choose_precision("fp16", "cpu") is Precision.FP16
    with pytest.raises(ModelError, match=r"no CUDA provider.*onnxruntime-gpu"):
        resolve_device("cuda")
    with pytest.raises(ModelError, match="no CUDA provider"):
        Runner(tiny_model.model_file, device="cuda", threads=1, slots=1, max_len=8)
    with pytest.raises(ModelError, match="unknown precision"):
        choose_precision("fp8", "cpu")


def test_optimum_graphs_refuse_the_device_pool(tiny_model: PreparedModel, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="host KV pool"):
        Runner(
            tiny_model.model_file,
            device="cpu",
            threads=1,
            slots=1,
            max_len=8,
            style="optimum",
            kv_pool="device",
        )


def test_a_device_pool_holds_no_more_slots_than_the_kv_budget() -> None:
    model = PreparedModel("m", Path("."), Path("m.onnx"), "genai", 4096, kv_bytes_per_token=2**16)
    settings = EngineSettings(kv_slots=32, kv_budget_mb=1024)  # 1 GiB: 4 chats of 4096 x 64 KiB
    assert kv_slots(model, settings, 4096, "cpu") == 32  # the host pool commits lazily
    assert kv_slots(model, settings, 4096, "cuda") == 4
    assert kv_slots(model, settings, 1024, "cuda") == 16
    assert kv_slots(model, EngineSettings(kv_budget_mb=1), 4096, "cuda") == 1
