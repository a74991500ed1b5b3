"""On a GPU: the fp16 build on CUDA with its device KV pool decodes as on the CPU provider.

Skipped, with the reason in the summary (``-ra``), wherever onnxruntime has no working CUDA
provider, which includes CI. ``bench/gpu.sh`` runs this file on the GPU machine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.engine.models.onnx_builder import Precision
from service.engine.models.prepare import prepare_gguf
from service.engine.runner import Runner, cuda_answers, resolve_device
from tests.engine.test_device_pool import _decode, _next
from tests.engine.tiny_model import write_tiny_gguf

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not cuda_answers(), reason="no CUDA: onnxruntime-gpu is not installed or no GPU answers"
    ),
]


@pytest.fixture(scope="module")
def fp16_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Path:
    work = tmp_path_factory.mktemp("cuda")
    gguf_path = write_tiny_gguf(work / "tiny.gguf", smollm2_gguf)
    return prepare_gguf(gguf_path, work / "fp16", precision=Precision.FP16, progress=False)


def test_auto_is_cuda() -> None:
    assert resolve_device("auto") == "cuda"


def test_cuda_decodes_as_the_cpu(fp16_dir: Path) -> None:
    cuda = Runner(fp16_dir / "model.onnx", device="cuda", threads=1, slots=4, max_len=64)
    cpu = Runner(fp16_dir / "model.onnx", device="cpu", threads=1, slots=4, max_len=64)
    assert cuda.kv_pool == "device"
    got, expected = _decode(cuda), _decode(cpu)
    agreement = np.mean(
        [a == b for g, e in zip(got, expected, strict=True) for a, b in zip(g, e, strict=True)]
    )
    print(f"CUDA against CPU, fp16 greedy tokens: agreement {agreement:.3f}")
    assert agreement >= 0.9


def test_slot_moves_on_the_gpu(fp16_dir: Path) -> None:
    runner = Runner(fp16_dir / "model.onnx", device="cuda", threads=1, slots=4, max_len=64)
    tokens = _decode(runner, steps=4)
    length = 7 + 4
    expected = _next(runner, 0, tokens[0][-1], length)
    runner.copy_slot(0, 3, length)
    np.testing.assert_array_equal(_next(runner, 3, tokens[0][-1], length), expected)
    runner.swap_slots(0, 1, length, 5 + 4)
    np.testing.assert_array_equal(_next(runner, 1, tokens[0][-1], length), expected)
