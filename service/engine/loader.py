"""Turn a prepared model directory into a running-ready ``Engine``."""

from __future__ import annotations

from service.config import EngineSettings
from service.engine.engine import Engine
from service.engine.models.registry import PreparedModel
from service.engine.runner import Runner, resolve_device
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


def kv_slots(model: PreparedModel, settings: EngineSettings, context: int, device: str) -> int:
    """How many chats' caches the runner holds. On the CPU, ``settings.kv_slots``: the host pool commits
    memory only as it is written, and LRU eviction keeps it within ``--kv-budget-mb``. On CUDA
    the pool is allocated whole at start, so the slots are also capped to what the budget holds
    at full context (at least one): raise ``--kv-budget-mb`` for larger batches on a GPU."""
    if device != "cuda" or model.kv_bytes_per_token <= 0:
        return settings.kv_slots
    fits = settings.kv_budget_mb * 2**20 // (context * model.kv_bytes_per_token)
    return max(1, min(settings.kv_slots, fits))


def load_engine(model: PreparedModel, settings: EngineSettings) -> Engine:
    """Load the graph and tokenizer (blocking: call it off the event loop)."""
    try:
        tokenizer = ChatTokenizer.from_dir(model.directory)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the tokenizer of {model.directory}: {exc}") from exc
    device = resolve_device(settings.device)
    context = served_context(model, settings)
    runner = Runner(
        model.model_file,
        device=device,
        threads=settings.resolved_threads(),
        slots=kv_slots(model, settings, context, device),
        max_len=context,
        style=model.style,
    )
    return Engine(runner, tokenizer, settings)
