"""One generation's state inside the engine worker: tokens, sampling, text, timings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import TYPE_CHECKING

import numpy as np

from service.engine.kv_cache import CacheEntry
from service.engine.sampling import Sampler
from service.engine.stopping import StopMatcher
from service.engine.tokenizer import IncrementalDetokenizer
from service.engine.types import ChatKey, Delta, FinishReason, GenerationId, GenerationResult, SamplingParams

if TYPE_CHECKING:
    from service.engine.beam_group import BeamGroup


class Phase(Enum):
    WAITING = auto()
    PREFILL = auto()
    DECODE = auto()
    FINISHED = auto()


@dataclass(slots=True, eq=False)
class Sequence:
    id: GenerationId
    chat: ChatKey
    prompt: list[int]
    params: SamplingParams
    sampler: Sampler
    detokenizer: IncrementalDetokenizer
    stop: StopMatcher
    eos_ids: frozenset[int]
    max_len: int  # positions the slot can hold
    phase: Phase = Phase.WAITING
    entry: CacheEntry | None = None
    prefilled: int = 0  # prompt positions whose K/V are in the slot
    cached_tokens: int = 0
    shared_tokens: int = 0  # of the cached ones, copied from another chat's cache
    prefix_hashes: list[int] = field(default_factory=list)  # prefix_index.prompt_hashes(prompt)
    # A fork (``Engine.submit_fork``): the generation that prefills the shared prompt, and,
    # on that leader, its first-token logits kept for followers admitted after its prefill.
    leader: Sequence | None = None
    waits_for_leader: bool = False  # admitted, its slot empty until the leader's prefill ends
    fork_logits: np.ndarray | None = None
    # A beam of a beam search (``Engine.submit_beam``): the group decides its tokens, not ``accept``.
    beam: BeamGroup | None = None
    generated: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    emitted_tokens: int = 0  # generated tokens already covered by deltas
    cancel_requested: bool = False
    reason: FinishReason | None = None
    error: str | None = None
    submitted_at: float = field(default_factory=time.perf_counter)
    admitted_at: float | None = None
    first_token_at: float | None = None

    @property
    def context(self) -> list[int]:
        return self.prompt + self.generated

    def accept(self, logits: np.ndarray) -> Delta | None:
        """Sample the next token from ``logits``; return the text it completes, if any.

        Sets ``reason`` when the generation is over (end-of-sequence, a stop string,
        max_tokens, or a full context).
        """
        token = self.sampler.sample(logits, self.context, self.generated)
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        self.generated.append(token)
        if token in self.eos_ids:
            self.reason = FinishReason.STOP
            return self._emit(self.detokenizer.flush(), final=True)
        piece = self.detokenizer.push(token)
        if (
            len(self.generated) >= self.params.max_tokens
            or len(self.prompt) + len(self.generated) >= self.max_len
        ):
            self.reason = FinishReason.LENGTH
            return self._emit(piece + self.detokenizer.flush(), final=True)
        return self._emit(piece, final=False)

    def _emit(self, piece: str, *, final: bool) -> Delta | None:
        text, stopped = self.stop.feed(piece)
        if stopped:
            self.reason = FinishReason.STOP
        elif final:
            text += self.stop.flush()
        covered = len(self.generated) - self.emitted_tokens
        if not text and not ((final or stopped) and covered):
            return None
        delta = Delta(index=self.emitted_tokens, text=text, tokens=covered)
        self.emitted_tokens = len(self.generated)
        self.text.append(text)
        return delta

    def silent_tail(self) -> Delta | None:
        """A text-less delta for generated tokens no delta covers yet (bytes or a stop-string
        prefix held back when a generation is cancelled), so that the deltas of every
        generation account for all of its tokens."""
        covered = len(self.generated) - self.emitted_tokens
        if covered <= 0:
            return None
        delta = Delta(index=self.emitted_tokens, text="", tokens=covered)
        self.emitted_tokens = len(self.generated)
        return delta

    def finish(self, reason: FinishReason, error: str | None = None) -> None:
        if self.reason is None or reason in (FinishReason.CANCELLED, FinishReason.ERROR):
            self.reason = reason
        self.error = error
        self.phase = Phase.FINISHED

    def result(self) -> GenerationResult:
        end = time.perf_counter()
        assert self.reason is not None
        queued = (self.admitted_at or end) - self.submitted_at
        ttft = None if self.first_token_at is None else (self.first_token_at - self.submitted_at) * 1000
        decode_span = end - (self.first_token_at or end)
        rate = (len(self.generated) - 1) / decode_span if decode_span > 0 and len(self.generated) > 1 else 0.0
        return GenerationResult(
            reason=self.reason,
            text="".join(self.text),
            token_ids=list(self.generated),
            prompt_tokens=len(self.prompt),
            cached_tokens=self.cached_tokens,
            completion_tokens=len(self.generated),
            queued_ms=queued * 1000,
            ttft_ms=ttft,
            total_ms=(end - self.submitted_at) * 1000,
            tokens_per_s=rate,
            error=self.error,
            extra=self.sampler.report(),
        )
