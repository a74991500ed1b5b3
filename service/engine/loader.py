"""Turn a prepared model directory into a running-ready ``Engine``."""

from __future__ import annotations

from service.config import EngineSettings
from service.engine.engine import Engine
from service.engine.models.registry import PreparedModel
from service.engine.runner import Runner
from service.engine.tokenizer import ChatTokenizer
from service.errors import ModelError


def load_engine(model: PreparedModel, settings: EngineSettings) -> Engine:
    """Load the graph and tokenizer (blocking: call it off the event loop)."""
    try:
        tokenizer = ChatTokenizer.from_dir(model.directory)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the tokenizer of {model.directory}: {exc}") from exc
    runner = Runner(
        model.model_file,
        device=settings.device,
        threads=settings.resolved_threads(),
        slots=settings.kv_slots,
        max_len=min(model.context_length, settings.max_context),
        style=model.style,
    )
    return Engine(runner, tokenizer, settings)
