"""Value types shared by the engine's parts and its callers.

Kept free of onnxruntime and asyncio so that the scheduler, the sampler and the
server can all speak them without pulling in the runtime.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import NewType

from service.errors import InvalidParams

ChatKey = NewType("ChatKey", str)
"""Names one conversation's KV cache: ``"<owner>/<anything>"`` (the server uses
``"<user id>/<chat id>"``). A generation may start from the cached prefix of any key of
the same owner, the part before the first "/", and never from another owner's cache."""

GenerationId = NewType("GenerationId", int)


class FinishReason(StrEnum):
    STOP = "stop"  # end-of-sequence token or a stop string
    LENGTH = "length"  # max_tokens reached, or the context is full
    CANCELLED = "cancelled"
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-generation decoding settings; ``temperature == 0`` means greedy."""

    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # OpenAI's penalties: subtracted from the logits of every id generated so far, once
    # (presence) and once per occurrence (frequency).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def validate(self) -> None:
        """Raise ``InvalidParams`` (a ``ValueError``) naming the first field out of range."""
        try:
            self._check()
        except ValueError as exc:
            raise InvalidParams(str(exc)) from None

    def _check(self) -> None:
        if not 1 <= self.max_tokens <= 1_000_000:
            raise ValueError("max_tokens must be between 1 and 1000000")
        if not 0.0 <= self.temperature <= 10.0:
            raise ValueError("temperature must be between 0 and 10")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise ValueError("repetition_penalty must be in (0, 10]")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError("seed must be in [0, 2**63)")
        if len(self.stop) > 16 or any(not s or len(s) > 256 for s in self.stop):
            raise ValueError("stop takes at most 16 non-empty strings of at most 256 characters")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be between -2 and 2")


@dataclass(frozen=True, slots=True)
class Delta:
    """New text of one generation. ``tokens`` counts the generated tokens it covers
    (more than one when bytes of a multi-byte character were held back). The deltas of a
    generation cover every generated token once: tokens without text (end of sequence, a
    stop string, a character cut off) come in a last delta whose text may be empty."""

    index: int  # position of the first generated token this delta covers
    text: str
    tokens: int = 1


@dataclass(slots=True)
class GenerationResult:
    """The final record of one generation, whatever ended it."""

    reason: FinishReason
    text: str
    token_ids: list[int]  # the ids the model produced (what a re-prefill must be fed)
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    queued_ms: float
    ttft_ms: float | None
    total_ms: float
    tokens_per_s: float
    error: str | None = None
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BeamCandidate:
    """One finished hypothesis of a beam search, as reported at its end."""

    text: str
    token_ids: list[int]
    logprob: float  # cumulative log-probability of its tokens under the model
    score: float | None  # under the scorer (None: a reranker had no text of it to score)
    reason: FinishReason


@dataclass(slots=True)
class BeamResult(GenerationResult):
    """The end of a beam search (``Engine.submit_beam``): the winner's text and ids, and how it
    was streamed. The deltas before it cover the tokens every beam agreed on while the search
    ran (``streamed_early`` of them); ``tail`` is the winner's text after those."""

    scorer: str = "logprob"
    width: int = 1
    streamed_early: int = 0
    tail: str = ""
    candidates: list[BeamCandidate] = field(default_factory=list)  # the winner first
    steps: int = 0  # decode steps the search took
