"""Turn a prepared model directory into a running-ready ``Engine``."""

from __future__ import annotations

from service.config import EngineSettings
from service.engine.engine import Engine
from service.engine.models.registry import PreparedModel
from service.engine.runner import Runner
from service.engine.tokenizer import ChatTokenizer
from service.errors import ModelError

# Positions per chat for a graph whose KV size per token is unknown (an odd ONNX export).
FALLBACK_CONTEXT = 4096


def served_context(model: PreparedModel, settings: EngineSettings) -> int:
    """The positions per chat really served: ``--max-context`` when given (never more than the
    model's), else the model's context capped to what one chat's cache can hold within the
    KV budget."""
    if settings.max_context is not None:
        return min(model.context_length, settings.max_context)
    if model.kv_bytes_per_token <= 0:
        return min(model.context_length, FALLBACK_CONTEXT)
    fits = settings.kv_budget_mb * 2**20 // model.kv_bytes_per_token
    return max(1, min(model.context_length, fits))


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
        max_len=served_context(model, settings),
        style=model.style,
    )
    return Engine(runner, tokenizer, settings)
