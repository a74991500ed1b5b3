"""Engine fixtures: running engines on the tiny model (fast) and the default model (slow)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import pytest

from service.config import EngineSettings
from service.engine.engine import Engine
from service.engine.loader import load_engine
from service.engine.models.registry import PreparedModel

EngineFactory = Callable[..., AbstractAsyncContextManager[Engine]]


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
