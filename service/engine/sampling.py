"""Next-token choice from logits: repetition, presence and frequency penalties, temperature,
top-k, top-p."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from collections.abc import Sequence

    from service.engine.types import SamplingParams

# Nucleus sampling sorts only the tokens at least this likely when they hold top_p of the
# mass, trying each threshold in turn before sorting the whole vocabulary.
_NUCLEUS_THRESHOLDS = (1e-3, 1e-5)
_BLOCK = 1024


class Sampler:
    """Chooses the tokens of one generation; a given seed makes its draws reproducible."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        bit_generator = np.random.PCG64(params.seed) if params.seed is not None else np.random.PCG64()
        self._rng = np.random.Generator(bit_generator)

    def sample(
        self, logits: npt.NDArray[np.float32], previous_ids: Sequence[int], generated: Sequence[int] = ()
    ) -> int:
        """Pick the next token id; ``previous_ids`` (prompt and generated) feed the repetition
        penalty, ``generated`` (the ids sampled so far) the presence and frequency penalties."""
        p = self.params
        scores = np.asarray(logits, dtype=np.float32)
        if p.repetition_penalty != 1.0 and len(previous_ids):
            scores = _penalize(scores, previous_ids, p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and len(generated):
            scores = _penalize_additive(scores, generated, p.presence_penalty, p.frequency_penalty)
        if p.temperature == 0.0:
            return int(np.argmax(scores))
        ids: npt.NDArray[np.intp] | None = None  # None: every id is a candidate
        if 0 < p.top_k < scores.size:  # a positive temperature keeps the order: cut first
            cut = scores.size - p.top_k
            ids = np.argpartition(scores, cut)[cut:]
            scores = scores[ids]
        probs = _softmax(scores.astype(np.float64), p.temperature)
        if p.top_p < 1.0:
            order = _nucleus(probs, p.top_p)
            ids = order if ids is None else ids[order]
            probs = probs[order]
        return self._draw(probs, ids)

    def _draw(self, probs: npt.NDArray[np.float64], ids: npt.NDArray[np.intp] | None) -> int:
        pick = _pick(probs, self._rng.random())
        return pick if ids is None else int(ids[pick])

    def report(self) -> dict[str, float]:
        """What the sampler measured, for ``GenerationResult.extra``."""
        return {}


class ForcedSampler(Sampler):
    """Takes no choice: returns ``tokens`` in turn, adding up their log-probability under the
    model's raw logits (teacher forcing; a reranker scoring a given text)."""

    def __init__(self, params: SamplingParams, tokens: Sequence[int]) -> None:
        super().__init__(params)
        self.tokens = list(tokens)
        self.logprob = 0.0
        self.scored = 0

    def sample(
        self, logits: npt.NDArray[np.float32], previous_ids: Sequence[int], generated: Sequence[int] = ()
    ) -> int:
        token = self.tokens[len(generated)]
        x = np.asarray(logits, dtype=np.float64)
        top = x.max()
        self.logprob += float(x[token] - top - np.log(np.exp(x - top).sum()))
        self.scored += 1
        return token

    def report(self) -> dict[str, float]:
        return {"logprob": self.logprob, "scored_tokens": float(self.scored)}


_LOWEST = float(np.finfo(np.float32).min)


def _penalize(
    logits: npt.NDArray[np.float32], previous_ids: Sequence[int], penalty: float
) -> npt.NDArray[np.float32]:
    """The CTRL rule: move the logits of already-seen ids towards "less likely". Returns a copy."""
    out = logits.copy()
    seen = np.asarray(previous_ids, dtype=np.intp)  # repeats are harmless: each gets the same value
    values = out[seen]
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        out[seen] = np.where(values > 0, values / penalty, values * penalty)
    # An extreme penalty overflows float32: keep the order, drop the infinities.
    np.nan_to_num(out, copy=False, nan=_LOWEST, posinf=-_LOWEST, neginf=_LOWEST)
    return out


def _penalize_additive(
    logits: npt.NDArray[np.float32], generated: Sequence[int], presence: float, frequency: float
) -> npt.NDArray[np.float32]:
    """OpenAI's rule: ``logit[j] -= count[j] * frequency + (count[j] > 0) * presence``, where
    ``count[j]`` is how often ``j`` was sampled so far. Returns a copy."""
    ids, counts = np.unique(np.asarray(generated, dtype=np.intp), return_counts=True)
    out = logits.copy()
    out[ids] -= (counts * frequency + presence).astype(np.float32)
    return out


def _softmax(x: npt.NDArray[np.float64], temperature: float) -> npt.NDArray[np.float64]:
    """softmax(x / temperature), computed in place in ``x``.

    In place because a fresh vocabulary-sized temporary can cost more (page faults on
    newly mapped memory) than the arithmetic itself.
    """
    x -= x.max()  # first: a tiny temperature then scales values <= 0, never overflowing to inf - inf
    with np.errstate(
        over="ignore", divide="ignore"
    ):  # to -inf, whose exp is 0: what a tiny temperature means
        x /= temperature
    np.exp(x, out=x)
    x /= x.sum()
    return x


def _nucleus(probs: npt.NDArray[np.float64], top_p: float) -> npt.NDArray[np.intp]:
    """Indices of the smallest most-likely set whose mass reaches ``top_p``, most likely first."""
    order: npt.NDArray[np.intp] | None = None
    # Every token at or above a threshold outranks every token below it, so when those
    # above already hold top_p of the mass the nucleus is among them: sort only those.
    for threshold in _NUCLEUS_THRESHOLDS:
        above = np.flatnonzero(probs >= threshold)
        if probs[above].sum() >= top_p:
            order = above[np.argsort(-probs[above])]
            break
    if order is None:
        order = np.argsort(-probs)
    cumulative = np.cumsum(probs[order])
    keep = min(int(np.searchsorted(cumulative, top_p, side="left")) + 1, order.size)
    return order[:keep]


def _pick(weights: npt.NDArray[np.float64], u: float) -> int:
    """Index drawn with probability proportional to ``weights``, for ``u`` uniform in [0, 1).

    A plain cumulative sum over a whole vocabulary is the slowest step of sampling, so
    large arrays are searched in two levels: block sums first, then one block.
    """
    n = weights.size
    if n <= 4 * _BLOCK:
        cumulative = np.cumsum(weights)
        return min(int(np.searchsorted(cumulative, u * cumulative[-1], side="right")), n - 1)
    whole = n - n % _BLOCK
    sums = np.append(weights[:whole].reshape(-1, _BLOCK).sum(axis=1), weights[whole:].sum())
    cumulative = np.cumsum(sums)
    target = u * cumulative[-1]
    block = min(int(np.searchsorted(cumulative, target, side="right")), sums.size - 1)
    start = block * _BLOCK
    inside = weights[start : start + _BLOCK]
    rest = target - (cumulative[block - 1] if block else 0.0)
    i = int(np.searchsorted(np.cumsum(inside), rest, side="right"))
    if i >= inside.size:  # rounding ran past the block: take its last token that has any weight
        i = int(np.flatnonzero(inside)[-1])
    return start + i
