"""Beam search bookkeeping (``service.engine.beam``) on toy models: pure, no ONNX."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.engine.beam import BeamSearch, ScorerName, log_softmax, score
from service.engine.types import FinishReason

EOS = 0
Model = Callable[[tuple[int, ...]], np.ndarray]


def table_model(seed: int, vocab: int) -> Model:
    """Logits that depend on the whole prefix (a hash of it seeds them): a toy language model."""

    def logits(prefix: tuple[int, ...]) -> np.ndarray:
        rng = np.random.default_rng([seed, len(prefix), *prefix])
        return rng.normal(0, 2, vocab).astype(np.float32)

    return logits


def run(search: BeamSearch, model: Model) -> list[tuple[int, ...]]:
    """Run ``search`` to its end; the agreed prefix after every step."""
    agreed = []
    while not search.over:
        search.step(np.stack([model(b.tokens) for b in search.live]))
        agreed.append(search.agreed_prefix())
    return agreed


def logprob_of(model: Model, tokens: tuple[int, ...]) -> float:
    return sum(float(log_softmax(model(tokens[:i]))[t]) for i, t in enumerate(tokens))


def exhaustive_best(model: Model, vocab: int, max_tokens: int, scorer: ScorerName) -> tuple[int, ...]:
    """The best complete sequence of all: it ends with EOS, or has ``max_tokens`` tokens."""
    complete = []
    for n in range(1, max_tokens + 1):
        for tokens in itertools.product(range(vocab), repeat=n):
            if EOS in tokens[:-1] or (n < max_tokens and tokens[-1] != EOS):
                continue
            complete.append(tokens)
    return max(complete, key=lambda t: score(scorer, logprob_of(model, t), len(t)))


def test_log_softmax_rows_are_log_probabilities() -> None:
    """Each row exponentiates to a distribution and keeps the logits' differences."""
    logits = np.asarray([[1.0, 2.0, 3.0], [1000.0, 0.0, -1000.0]], dtype=np.float32)
    out = log_softmax(logits)
    assert np.allclose(np.exp(out).sum(axis=1), 1.0)
    assert math.isclose(out[0, 2] - out[0, 0], 2.0)
    assert np.isfinite(out).all()


def test_width_one_is_greedy_with_ties_to_the_lower_id() -> None:
    """Width 1 takes the argmax each step (np.argmax's tie rule) and ends at EOS."""
    rows = {(): [0.0, 5.0, 5.0, 1.0], (1,): [0.0, 1.0, 1.0, 4.0], (1, 3): [9.0, 1.0, 1.0, 1.0]}
    search = BeamSearch(width=1, max_tokens=10, eos_ids=frozenset({EOS}))
    run(search, lambda p: np.asarray(rows[p], dtype=np.float32))
    (winner,) = search.ranking()
    assert winner.tokens == (1, 3, 0)
    assert winner.reason is FinishReason.STOP


@pytest.mark.parametrize("scorer", ["logprob", "length_normalised"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_beam_as_wide_as_the_tree_finds_the_exhaustive_best(scorer: ScorerName, seed: int) -> None:
    """With width >= vocab ** (max_tokens - 1) nothing is ever cut off, so the winner is the best
    complete sequence found by enumerating them all; its log-probability is recomputed exactly."""
    vocab, max_tokens = 4, 3
    model = table_model(seed, vocab)
    search = BeamSearch(width=vocab**2, max_tokens=max_tokens, eos_ids=frozenset({EOS}), scorer=scorer)
    run(search, model)
    winner = search.ranking()[0]
    assert winner.tokens == exhaustive_best(model, vocab, max_tokens, scorer)
    assert math.isclose(winner.logprob, logprob_of(model, winner.tokens), abs_tol=1e-9)


def test_the_agreed_prefix_is_what_every_surviving_beam_shares() -> None:
    """Token 1 leads to two strong continuations, token 2 to weak ones: after step 2 both beams
    start with 1, which is then agreed, and the winner starts with it."""

    def model(prefix: tuple[int, ...]) -> np.ndarray:
        if prefix == ():
            return np.asarray([-9, 2.0, 1.9, -9, -9], dtype=np.float32)
        if prefix == (1,):
            return np.asarray([-9, -9, -9, 3.0, 3.0], dtype=np.float32)
        return np.asarray([-9, 0.0, 0.0, 0.0, 0.0], dtype=np.float32)

    search = BeamSearch(width=2, max_tokens=4, eos_ids=frozenset({EOS}))
    agreed = run(search, model)
    assert agreed[0] == ()
    assert agreed[1] == (1,)
    assert search.ranking()[0].tokens[:1] == (1,)


def test_a_finished_hypothesis_no_beam_can_beat_ends_the_search() -> None:
    """Under the log-probability scorer, EOS far likelier than anything else ends the search at
    once: every other beam can only lose probability, so it is dropped, and the winner is agreed."""
    search = BeamSearch(width=3, max_tokens=50, eos_ids=frozenset({EOS}))
    outcome = search.step(np.asarray([[10.0, 0.0, 0.0, 0.0]], dtype=np.float32))
    assert outcome.over
    assert search.agreed_prefix() == (EOS,)
    assert [h.tokens for h in search.ranking()] == [(EOS,)]


def test_length_normalised_keeps_beams_that_could_still_overtake() -> None:
    """The same EOS under the length-normalised scorer does not end the search: a beam's later
    tokens could raise its average, up to its log-probability over max_tokens."""
    search = BeamSearch(width=3, max_tokens=50, eos_ids=frozenset({EOS}), scorer="length_normalised")
    outcome = search.step(np.asarray([[3.0, 2.0, 0.0, 0.0]], dtype=np.float32))
    assert not outcome.over
    assert [c.token for c in outcome.children] == [1, 2, 3]
    assert search.agreed_prefix() == ()


def test_stop_predicate_and_max_tokens_finish_hypotheses() -> None:
    """A beam whose text holds a stop string ends with reason stop; at max_tokens, with length."""
    search = BeamSearch(
        width=2, max_tokens=2, eos_ids=frozenset({EOS}), stopped=lambda tokens: tokens[-1] == 3
    )
    run(search, lambda p: np.asarray([-5.0, 2.0, 0.5, 1.0], dtype=np.float32))
    reasons = {h.tokens: h.reason for h in search.ranking()}
    assert reasons == {(1, 1): FinishReason.LENGTH, (3,): FinishReason.STOP}


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="width"):
        BeamSearch(width=0, max_tokens=4, eos_ids=frozenset())
    search = BeamSearch(width=2, max_tokens=4, eos_ids=frozenset())
    with pytest.raises(ValueError, match="one row of logits per live beam"):
        search.step(np.zeros((2, 4), dtype=np.float32))


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    width=st.integers(1, 4),
    scorer=st.sampled_from(["logprob", "length_normalised", "reranker"]),
)
def test_the_agreed_prefix_only_grows_and_starts_the_winner(
    seed: int, width: int, scorer: ScorerName
) -> None:
    """On random toy models, every agreed prefix extends the one before and the winner starts
    with each (under ``reranker``, whichever candidate a reranker picks: every one does); the
    winner is the best finished hypothesis under the scorer."""
    model = table_model(seed, 6)
    search = BeamSearch(width=width, max_tokens=6, eos_ids=frozenset({EOS}), scorer=scorer)
    agreed = run(search, model)
    winners = search.ranking() if scorer == "reranker" else search.ranking()[:1]
    for before, after in itertools.pairwise([(), *agreed]):
        assert after[: len(before)] == before
    for winner in winners:
        assert all(winner.tokens[: len(a)] == a for a in agreed)
    if scorer != "reranker":
        assert agreed[-1] == winners[0].tokens
    scores = [search.score(h) for h in search.ranking()]
    assert scores == sorted(scores, reverse=True)
