"""The models a server offers: each prepared at start, loaded on first use, then shared.

The first model named is the default and is loaded before the server accepts
connections; the others load when a session first asks for them (``loaded`` in the
``models`` frame tells which are warm). Loading runs off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

from service.config import EngineSettings
from service.engine.engine import Engine
from service.engine.loader import load_engine, served_context
from service.engine.models.onnx_builder import Precision
from service.engine.models.registry import PreparedModel, parse_model_arg, resolve
from service.engine.models.sampling_defaults import SamplingDefaults
from service.errors import ModelError
from service.protocol.frames import ModelBody

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Entry:
    model: PreparedModel
    engine: Engine | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class ModelPool:
    def __init__(self, models: list[PreparedModel], settings: EngineSettings) -> None:
        if not models:
            raise ModelError("no model configured")
        self._settings = settings
        self._entries: dict[str, _Entry] = {}
        for model in models:
            if model.id in self._entries:
                raise ModelError(f"two models share the id {model.id!r}")
            self._entries[model.id] = _Entry(model)
        self.default_id = models[0].id

    @classmethod
    async def prepare(
        cls, names: list[str], data_dir: Path, precision: Precision, settings: EngineSettings
    ) -> ModelPool:
        """Resolve (and on first use prepare, with progress) every named model, then load
        the default one. Raises ``ModelError``."""
        prepared = []
        for name in names:
            spec = parse_model_arg(name)
            prepared.append(
                await asyncio.to_thread(resolve, spec, data_dir, precision=precision, progress=True)
            )
        pool = cls(prepared, settings)
        await pool.engine(pool.default_id)
        return pool

    def sampling_defaults(self, model_id: str) -> SamplingDefaults:
        """What ``model_id`` samples with where a client gives no value (the model's own defaults)."""
        entry = self._entries.get(model_id)
        return entry.model.sampling if entry is not None else SamplingDefaults()

    def __contains__(self, model_id: str) -> bool:
        return model_id in self._entries

    @property
    def ready(self) -> bool:
        return self._entries[self.default_id].engine is not None

    def loaded(self) -> list[Engine]:
        return [e.engine for e in self._entries.values() if e.engine is not None]

    def describe(self) -> list[ModelBody]:
        return [
            ModelBody(
                id=model_id,
                context_length=served_context(entry.model, self._settings),
                loaded=entry.engine is not None,
                default=model_id == self.default_id,
                chat=entry.model.chat,
            )
            for model_id, entry in self._entries.items()
        ]

    async def engine(self, model_id: str) -> Engine:
        """The running engine of ``model_id``, loading it once; raises ``ModelError``."""
        entry = self._entries.get(model_id)
        if entry is None:
            raise ModelError(f"unknown model {model_id!r}; available: {', '.join(self._entries)}")
        async with entry.lock:
            if entry.engine is None:
                engine = await asyncio.to_thread(load_engine, entry.model, self._settings)
                await engine.start()
                log.info(
                    "loaded model %s from %s on %s; default sampling %s (%s)",
                    model_id,
                    entry.model.directory,
                    engine.runner.device,
                    entry.model.sampling.params(),
                    entry.model.sampling.source,
                )
                entry.engine = engine
        return entry.engine

    async def close(self) -> None:
        for entry in self._entries.values():
            if entry.engine is not None:
                await entry.engine.close()
                entry.engine = None
