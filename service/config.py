"""All configuration in one place: frozen settings objects, built once and passed in."""

from __future__ import annotations

import os
from dataclasses import dataclass


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)))


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineSettings:
    """How the engine uses the machine.

    ``kv_budget_mb`` bounds the memory of cached chats (least recently used chats are
    evicted past it and simply re-prefill on their next turn); ``kv_slots`` bounds how
    many chats can hold a cache at once; ``max_context`` caps the positions per chat.
    """

    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # 0 = every core this process may use
    max_batch: int = 16  # generations decoded together in one model run
    max_waiting: int = 256  # bounded FIFO queue behind them
    kv_slots: int = 32
    kv_budget_mb: int = 2048
    max_context: int = 4096
    prefill_chunk: int = 512  # tokens per prefill run when nobody is decoding
    interleaved_chunk: int = 64  # tokens per prefill run while others decode

    def resolved_threads(self) -> int:
        return self.threads or default_threads()
