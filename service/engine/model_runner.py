"""What the engine needs from a model runner, as a ``Protocol``.

``service.engine.runner.Runner`` (ONNX Runtime) is the real one; engine and scheduler tests
run a fake that implements the same few calls with no model at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True, slots=True)
class ModelShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    kv_itemsize: int = 4  # bytes per cached value: 4 (float32) or 2 (float16)

    @property
    def kv_bytes_per_token(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.kv_itemsize


class ModelRunner(Protocol):
    """A pool of ``slots`` KV caches of ``max_len`` positions each, and a model that runs over them.

    Called from the engine's one worker thread only.
    """

    @property
    def device(self) -> str: ...

    @property
    def slots(self) -> int: ...

    @property
    def max_len(self) -> int: ...

    @property
    def shape(self) -> ModelShape: ...

    def forward(self, first_slot: int, tokens: np.ndarray, past_lengths: Sequence[int]) -> np.ndarray:
        """Run one step: int64 ``tokens[batch, seq]`` for slots ``first_slot..+batch`` (either
        batch or seq is 1), slot b already holding ``past_lengths[b]`` positions; returns the last
        position's logits, float32 ``[batch, vocab]`` (a view the next call may overwrite)."""
        ...

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of slot ``src``'s cache into slot ``dst``."""
        ...

    def swap_slots(self, a: int, b: int, length_a: int, length_b: int) -> None:
        """Exchange two slots' caches (the first ``length_*`` positions of each)."""
        ...

    def release_slot(self, slot: int) -> None:
        """Give a slot's memory back; its contents become undefined."""
        ...
