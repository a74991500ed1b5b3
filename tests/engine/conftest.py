"""Engine fixtures: a tiny random-weight model (fast) and the real default model (slow)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from service.config import EngineSettings
from service.engine.engine import Engine
from service.engine.loader import load_engine
from service.engine.models.onnx_builder import Precision
from service.engine.models.prepare import prepare_gguf
from service.engine.models.registry import PreparedModel, describe_dir, parse_model_arg, resolve
from tests.conftest import CACHE_DIR
from tests.engine.tiny_model import write_tiny_gguf

EngineFactory = Callable[..., AbstractAsyncContextManager[Engine]]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> PreparedModel:
    """A 2-layer random Llama with the real SmolLM2 tokenizer, built as int8 by our builder."""
    work = tmp_path_factory.mktemp("tiny")
    gguf_path = write_tiny_gguf(work / "tiny.gguf", smollm2_gguf)
    directory = prepare_gguf(gguf_path, work / "model", precision=Precision.INT8, progress=False)
    return describe_dir("tiny", directory)


@pytest.fixture(scope="session")
def default_model() -> PreparedModel:
    """The real default model (SmolLM2-135M-Instruct, int8), prepared once per machine."""
    return resolve(parse_model_arg("default"), CACHE_DIR, precision=Precision.INT8, progress=False)


def _factory(model: PreparedModel) -> EngineFactory:
    @asynccontextmanager
    async def running(**overrides: Any) -> AsyncIterator[Engine]:
        settings = EngineSettings(**{"threads": 2, "kv_slots": 16, "max_context": 1024, **overrides})
        engine = load_engine(model, settings)
        await engine.start()
        try:
            yield engine
        finally:
            await engine.close()

    return running


@pytest.fixture(scope="session")
def tiny_engine(tiny_model: PreparedModel) -> EngineFactory:
    """``async with tiny_engine(**settings) as engine`` runs an engine on the tiny model."""
    return _factory(tiny_model)


@pytest.fixture(scope="session")
def default_engine(default_model: PreparedModel) -> EngineFactory:
    """``async with default_engine(**settings) as engine`` runs an engine on the default model."""
    return _factory(default_model)
