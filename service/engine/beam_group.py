"""One beam search inside the engine: its sequences, its search and the text it streams.

The engine prefills the prompt once (in the first member's slot), then every live beam is a
decoding sequence of the normal batched step, one row each. The group holds ``width`` sequences
(so ``width`` slots and places in the batch) from admission to the end: those not decoding
right now are parked, ready to take a copy of a parent's cache when beams split. The slot
moves themselves are the engine's (``Engine._beam_step``); this module keeps the search, which
sequence carries which beam, and the text: the agreed prefix streamed as soon as it is known
(held back like ``chat.v1``'s text where a character or a stop string is incomplete), then the
winner's tail and the candidates at the end.
"""

from __future__ import annotations

import time
from collections import abc
from dataclasses import dataclass, field

from service.engine.beam import BeamSearch, Hypothesis, ScorerName
from service.engine.sequence import Sequence
from service.engine.stopping import StopMatcher
from service.engine.tokenizer import ChatTokenizer, IncrementalDetokenizer
from service.engine.types import BeamCandidate, BeamResult, Delta, FinishReason


@dataclass(eq=False)
class BeamGroup:
    search: BeamSearch
    members: list[Sequence]  # every sequence holding a slot for this search; the first prefills
    tokenizer: ChatTokenizer
    stops: tuple[str, ...]
    live: list[Sequence] = field(default_factory=list)  # live[i] carries search.live[i]
    ended: bool = False
    first_step_at: float | None = None
    _detokenizer: IncrementalDetokenizer | None = None
    _stop: StopMatcher | None = None
    _agreed: tuple[int, ...] = ()  # agreed tokens given to the detokenizer
    _emitted: int = 0  # of those, the tokens deltas covered
    _text: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._detokenizer = self.tokenizer.detokenizer()
        self._stop = StopMatcher(self.stops)

    @classmethod
    def create(
        cls,
        members: list[Sequence],
        tokenizer: ChatTokenizer,
        stops: tuple[str, ...],
        *,
        width: int,
        max_tokens: int,
        scorer: ScorerName,
    ) -> BeamGroup:
        def stopped(tokens: abc.Sequence[int]) -> bool:
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            return any(stop in text for stop in stops)

        search = BeamSearch(
            width=width,
            max_tokens=max_tokens,
            eos_ids=tokenizer.eos_token_ids,
            scorer=scorer,
            stopped=stopped if stops else None,
        )
        return cls(search, members, tokenizer, stops)

    @property
    def leader(self) -> Sequence:
        return self.members[0]

    def advance(self) -> Delta | None:
        """The text of agreed tokens not streamed yet, if any is complete."""
        text, _ = self._feed(self.search.agreed_prefix())
        return self._delta(text)

    def _feed(self, tokens: tuple[int, ...]) -> tuple[str, bool]:
        assert self._detokenizer is not None
        assert self._stop is not None
        if tokens[: len(self._agreed)] != self._agreed:
            raise AssertionError("a beam search's agreed prefix changed")  # see beam.py: it only grows
        pieces = [self._detokenizer.push(t) for t in tokens[len(self._agreed) :]]
        self._agreed = max(self._agreed, tokens, key=len)
        return self._stop.feed("".join(pieces))

    def _delta(self, text: str) -> Delta | None:
        if not text:
            return None
        delta = Delta(index=self._emitted, text=text, tokens=len(self._agreed) - self._emitted)
        self._emitted = len(self._agreed)
        self._text.append(text)
        return delta

    def result(self, reason: FinishReason | None, error: str | None = None) -> BeamResult:
        """The record of the search: its winner when it ran to its end (``reason`` None), else
        what was streamed before it was cancelled or failed."""
        ranking = self.search.ranking()
        tail = ""
        if reason is None and ranking:
            winner = ranking[0]
            tokens = list(winner.tokens)
            reason = winner.reason
            tail = self._finish_text(winner.tokens)
        else:
            tokens = list(self._agreed)
            reason = reason or FinishReason.LENGTH
        leader = self.leader
        end = time.perf_counter()
        first = self.first_step_at
        span = end - (first or end)
        return BeamResult(
            reason=reason,
            text="".join(self._text) + tail,
            token_ids=tokens,
            prompt_tokens=len(leader.prompt),
            cached_tokens=leader.cached_tokens,
            completion_tokens=len(tokens),
            queued_ms=((leader.admitted_at or end) - leader.submitted_at) * 1000,
            ttft_ms=None if first is None else (first - leader.submitted_at) * 1000,
            total_ms=(end - leader.submitted_at) * 1000,
            tokens_per_s=(len(tokens) - 1) / span if span > 0 and len(tokens) > 1 else 0.0,
            error=error,
            scorer=self.search.scorer,
            width=self.search.width,
            streamed_early=self._emitted,
            tail=tail,
            candidates=[self._candidate(h) for h in ranking],
            steps=self.search.steps,
        )

    def _finish_text(self, tokens: tuple[int, ...]) -> str:
        """The winner's text after what the deltas gave: held-back bytes and stop-string
        prefixes included, anything from a stop string on cut off."""
        assert self._detokenizer is not None
        assert self._stop is not None
        text, stopped = self._feed(tokens)
        if not stopped:
            flushed, stopped = self._stop.feed(self._detokenizer.flush())
            text += flushed
            if not stopped:
                text += self._stop.flush()
        return text

    def _candidate(self, hypothesis: Hypothesis) -> BeamCandidate:
        detokenizer = self.tokenizer.detokenizer()
        stop = StopMatcher(self.stops)
        text, stopped = stop.feed("".join(detokenizer.push(t) for t in hypothesis.tokens))
        if not stopped:
            flushed, stopped = stop.feed(detokenizer.flush())
            text += flushed + ("" if stopped else stop.flush())
        return BeamCandidate(
            text=text,
            token_ids=list(hypothesis.tokens),
            logprob=hypothesis.logprob,
            score=self.search.score(hypothesis),
            reason=hypothesis.reason,
        )
