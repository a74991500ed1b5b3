"""Beam search bookkeeping: pure (no model, no threads, no I/O); the engine feeds it logits.

One search keeps up to ``width`` live beams (token lists with their cumulative log-probability
under the model). Each :meth:`BeamSearch.step` takes one row of logits per live beam and:

1. scores every continuation ``(beam, token)`` by ``beam.logprob + log_softmax(logits)[token]``;
2. walks them best first (ties: the lower beam, then the lower token id, so width 1 is greedy
   decoding exactly) and sorts each into

   - a **finished hypothesis**: the token is an end token, the text now holds a stop string, or
     the beam reaches ``max_tokens`` (the engine passes the context's end in there too);
   - a **live child**, which decodes on;

   until ``width`` children continue or ``width`` hypotheses have finished in this step;
3. drops the beams that can no longer win (below) and says whether the search is over.

**The scorer** decides the winner among the finished hypotheses: ``logprob`` (the cumulative
log-probability, what the search itself ranks by) or ``length_normalised`` (the cumulative
log-probability divided by the number of generated tokens, the end token included; the
re-ranking of ``use_rerank``), or ``reranker``: another model scores the finished hypotheses
once the search is over (the service's ``--reranker``), so while it runs any kept hypothesis may
still win. Only the ``width`` best finished hypotheses are kept (for ``reranker``, best by the
length-normalised log-probability); the others are no candidates.

**Which hypotheses can still win, and the agreed prefix.** A finished hypothesis's score never
changes, and ties go to the one that finished first; so among the finished only the best can
still win. A live beam can win only if some continuation of it can beat that best: every
continuation has a log-probability at most the beam's (log-probabilities are <= 0) and at most
``max_tokens`` tokens, so the best score a continuation can reach is the beam's log-probability
(``logprob``) or its log-probability over ``max_tokens`` (``length_normalised``, a negative
number over the longest length). A live beam whose bound does not beat the best finished score
is dropped; the search is over when no live beam is left. Under ``reranker`` nothing is known of
the final scores: every kept hypothesis and every live beam can still win, and no beam is dropped.
The **agreed prefix** is the longest common prefix of every hypothesis that can still win (the
live beams and the best finished one; under ``reranker`` every kept one): whatever the search
does next, the winner starts with it, so it can be streamed at once. It only grows: everything
that can win after a step continues (or is) something that could win before it, because a step
never raises a beam's bound nor lowers the best finished score (and under ``reranker`` a kept
hypothesis either stays kept or stops being a candidate).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from service.engine.types import FinishReason

ScorerName = Literal["logprob", "length_normalised", "reranker"]
SCORERS: tuple[ScorerName, ...] = ("logprob", "length_normalised", "reranker")


def score(scorer: ScorerName, logprob: float, length: int) -> float:
    """A finished hypothesis's score under ``scorer`` (for ``reranker``, the provisional one that
    decides which hypotheses are kept)."""
    if scorer == "logprob":
        return logprob
    return logprob / max(length, 1)


def bound(scorer: ScorerName, logprob: float, max_tokens: int) -> float:
    """The best score any continuation of a live beam with this log-probability can reach."""
    if scorer == "logprob":
        return logprob
    if scorer == "reranker":
        return math.inf
    return logprob / max_tokens


def log_softmax(logits: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
    """Row-wise log-softmax in float64."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    out: npt.NDArray[np.float64] = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return out


@dataclass(frozen=True, slots=True)
class Hypothesis:
    """A finished candidate: its generated tokens (an end token included) and log-probability."""

    tokens: tuple[int, ...]
    logprob: float
    reason: FinishReason  # STOP (end token or stop string) or LENGTH
    order: int  # when it finished, among all of this search's hypotheses (ties go to the first)


@dataclass(frozen=True, slots=True)
class Beam:
    tokens: tuple[int, ...]
    logprob: float


@dataclass(frozen=True, slots=True)
class Child:
    """A live beam after a step: ``parent`` indexes the live beams before it."""

    parent: int
    token: int


@dataclass(frozen=True, slots=True)
class StepOutcome:
    children: list[Child]  # the new live beams, in their new order
    over: bool  # nothing can change the winner any more


class BeamSearch:
    def __init__(
        self,
        *,
        width: int,
        max_tokens: int,
        eos_ids: frozenset[int],
        scorer: ScorerName = "logprob",
        stopped: Callable[[Sequence[int]], bool] | None = None,
    ) -> None:
        """``stopped(tokens)`` says whether a beam's text holds a stop string (it then ends);
        ``max_tokens`` counts generated tokens (the engine caps it at the context's end)."""
        if width < 1:
            raise ValueError("beam width must be at least 1")
        if max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if scorer not in SCORERS:
            raise ValueError(f"unknown scorer {scorer!r}")
        self.width = width
        self.max_tokens = max_tokens
        self.eos_ids = eos_ids
        self.scorer: ScorerName = scorer
        self._stopped = stopped
        self.live: list[Beam] = [Beam((), 0.0)]
        self.finished: list[Hypothesis] = []  # the best ``width``, best first
        self.steps = 0
        self._order = 0

    @property
    def over(self) -> bool:
        return not self.live

    def step(self, logits: npt.NDArray[np.floating]) -> StepOutcome:
        """Advance by one token: ``logits[i]`` are the next-token logits of ``live[i]``."""
        if self.over:
            raise RuntimeError("the search is over")
        if logits.ndim != 2 or logits.shape[0] != len(self.live):
            raise ValueError(f"one row of logits per live beam ({len(self.live)}), got {logits.shape}")
        self.steps += 1
        totals = log_softmax(logits) + np.asarray([b.logprob for b in self.live])[:, None]
        vocab = totals.shape[1]
        flat = totals.reshape(-1)
        children: list[Child] = []
        beams: list[Beam] = []
        ended = 0
        taken = 0
        k = min(flat.size, 2 * self.width + len(self.eos_ids) * self.width)
        while len(children) < self.width and ended < self.width and taken < flat.size:
            for index in _best(flat, k)[taken:]:
                taken += 1
                parent, token = divmod(int(index), vocab)
                tokens = (*self.live[parent].tokens, token)
                logprob = float(flat[index])
                reason = self._ends(tokens)
                if reason is None:
                    children.append(Child(parent, token))
                    beams.append(Beam(tokens, logprob))
                else:
                    self._finish(Hypothesis(tokens, logprob, reason, self._order))
                    self._order += 1
                    ended += 1
                if len(children) == self.width or ended == self.width:
                    break
            k = min(flat.size, 2 * k)
        kept = [i for i, beam in enumerate(beams) if self._can_win(beam)]
        self.live = [beams[i] for i in kept]
        return StepOutcome([children[i] for i in kept], self.over)

    def _ends(self, tokens: tuple[int, ...]) -> FinishReason | None:
        if tokens[-1] in self.eos_ids:
            return FinishReason.STOP
        if self._stopped is not None and self._stopped(tokens):
            return FinishReason.STOP
        if len(tokens) >= self.max_tokens:
            return FinishReason.LENGTH
        return None

    def _finish(self, hypothesis: Hypothesis) -> None:
        self.finished.append(hypothesis)
        self.finished.sort(key=lambda h: (-self.score(h), h.order))
        del self.finished[self.width :]

    def score(self, hypothesis: Hypothesis) -> float:
        return score(self.scorer, hypothesis.logprob, len(hypothesis.tokens))

    def _can_win(self, beam: Beam) -> bool:
        if not self.finished:
            return True
        return bound(self.scorer, beam.logprob, self.max_tokens) > self.score(self.finished[0])

    def contenders(self) -> list[tuple[int, ...]]:
        """The tokens of every hypothesis that can still win (see the module docstring)."""
        contending = self.finished if self.scorer == "reranker" else self.finished[:1]
        return [b.tokens for b in self.live] + [h.tokens for h in contending]

    def agreed_prefix(self) -> tuple[int, ...]:
        """The tokens every hypothesis that can still win starts with."""
        contenders = self.contenders()
        if not contenders:
            return ()
        first = contenders[0]
        length = len(first)
        for other in contenders[1:]:
            length = min(length, len(other))
            for i in range(length):
                if other[i] != first[i]:
                    length = i
                    break
        return first[:length]

    def ranking(self) -> list[Hypothesis]:
        """The finished hypotheses, the winner first."""
        return list(self.finished)

    def cancel(self) -> None:
        """End the search where it is (the finished hypotheses stay)."""
        self.live = []


def _best(flat: npt.NDArray[np.float64], k: int) -> list[int]:
    """Indexes of the ``k`` largest values, largest first, ties by the lower index."""
    if k < flat.size:
        top = np.argpartition(-flat, k - 1)[:k]
        # argpartition may cut a run of equal values anywhere: widen to every value tied with the k-th.
        top = np.flatnonzero(flat >= flat[top].min())
    else:
        top = np.arange(flat.size)
    order = np.lexsort((top, -flat[top]))
    return [int(i) for i in top[order]][:k]
