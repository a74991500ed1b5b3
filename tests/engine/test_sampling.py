from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from service.engine.sampling import Sampler, _nucleus
from service.engine.types import SamplingParams

VOCAB = 49152


def _logits(seed: int = 0) -> npt.NDArray[np.float32]:
    return np.random.default_rng(seed).normal(0.0, 3.0, VOCAB).astype(np.float32)


def test_greedy_is_argmax() -> None:
    """temperature 0 picks the argmax, whatever the seed."""
    logits = _logits()
    expected = int(np.argmax(logits))
    for seed in (None, 1, 2):
        assert Sampler(SamplingParams(temperature=0.0, seed=seed)).sample(logits, []) == expected


def test_greedy_tie_takes_lowest_id() -> None:
    """Ties under greedy go to the lowest id."""
    logits = np.zeros(10, dtype=np.float32)
    logits[[3, 7]] = 5.0
    assert Sampler(SamplingParams(temperature=0.0)).sample(logits, []) == 3


def test_seeded_sampling_is_reproducible() -> None:
    """The same seed yields the same sequence of draws."""
    logits = _logits()
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    a, b = Sampler(params), Sampler(params)
    draws_a = [a.sample(logits, []) for _ in range(50)]
    assert draws_a == [b.sample(logits, []) for _ in range(50)]
    assert len(set(draws_a)) > 1


def test_top_k_one_equals_greedy() -> None:
    """top_k=1 at any temperature gives the argmax."""
    logits = _logits(3)
    sampler = Sampler(SamplingParams(temperature=1.5, top_k=1, seed=7))
    assert {sampler.sample(logits, []) for _ in range(20)} == {int(np.argmax(logits))}


def test_top_k_restricts_candidates() -> None:
    """Draws under top_k come only from the k largest logits."""
    logits = _logits(4)
    top = set(np.argsort(-logits)[:5].tolist())
    sampler = Sampler(SamplingParams(temperature=5.0, top_k=5, seed=0))
    assert {sampler.sample(logits, []) for _ in range(200)} <= top


def test_repetition_penalty_changes_choice() -> None:
    """A seen token's positive logit is divided by the penalty, so another id wins."""
    logits = np.array([0.0, 2.0, 1.8, -1.0], dtype=np.float32)
    params = SamplingParams(temperature=0.0, repetition_penalty=1.2)
    assert Sampler(params).sample(logits, []) == 1
    assert Sampler(params).sample(logits, [1, 1, 3]) == 2


def test_repetition_penalty_multiplies_negative_logits() -> None:
    """A seen token's negative logit is multiplied by the penalty (made less likely)."""
    logits = np.array([-1.0, -1.1, -5.0], dtype=np.float32)
    params = SamplingParams(temperature=0.0, repetition_penalty=1.2)
    assert Sampler(params).sample(logits, [0]) == 1


def test_caller_logits_not_mutated() -> None:
    """Sampling leaves the caller's logits array unchanged."""
    logits = _logits(5)
    before = logits.copy()
    Sampler(SamplingParams(temperature=0.8, top_k=40, top_p=0.5, repetition_penalty=1.3, seed=1)).sample(
        logits, list(range(100))
    )
    np.testing.assert_array_equal(logits, before)


def test_tiny_top_p_keeps_only_the_max() -> None:
    """A tiny top_p leaves only the most likely token."""
    logits = _logits(6)
    sampler = Sampler(SamplingParams(temperature=2.0, top_p=1e-6, seed=3))
    assert {sampler.sample(logits, []) for _ in range(20)} == {int(np.argmax(logits))}


def test_top_p_flat_distribution() -> None:
    """With a flat distribution the nucleus covers about top_p of the vocabulary."""
    logits = np.zeros(VOCAB, dtype=np.float32)
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.5, seed=11))
    draws = {sampler.sample(logits, []) for _ in range(300)}
    assert len(draws) > 250


def test_sampling_follows_distribution() -> None:
    """Draws roughly follow softmax(logits / temperature)."""
    logits = np.log(np.array([0.7, 0.2, 0.1], dtype=np.float32))
    sampler = Sampler(SamplingParams(temperature=1.0, seed=42))
    counts = np.bincount([sampler.sample(logits, []) for _ in range(5000)], minlength=3) / 5000
    np.testing.assert_allclose(counts, [0.7, 0.2, 0.1], atol=0.03)


def test_nucleus_matches_full_sort() -> None:
    """The thresholded nucleus equals the one found by sorting the whole vocabulary."""
    rng = np.random.default_rng(8)
    for scale in (0.1, 1.0, 3.0, 10.0):
        logits = rng.normal(0.0, scale, VOCAB)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        for top_p in (1e-9, 0.3, 0.9, 0.999):
            order = np.argsort(-probs, kind="stable")
            keep = int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1
            assert set(_nucleus(probs, top_p).tolist()) == set(order[:keep].tolist())


def test_extreme_but_valid_params_still_pick_a_token() -> None:
    """A temperature or repetition penalty at the edge of the valid range (logits overflowing
    float32) still picks the most likely token instead of failing on NaN."""
    logits = np.linspace(-3.0, 3.0, 50_000, dtype=np.float32)
    best = int(np.argmax(logits))
    for params in (
        SamplingParams(temperature=1e-310, seed=1),
        SamplingParams(temperature=1.0, repetition_penalty=1e-40, seed=1),
        SamplingParams(temperature=1e-6, repetition_penalty=1e-40, top_p=0.5, top_k=10, seed=1),
        SamplingParams(temperature=5e-324, repetition_penalty=5e-324, seed=1),
    ):
        params.validate()
        choice = Sampler(params).sample(logits, [best - 1, 7])
        assert 0 <= choice < logits.size
        assert logits[choice] > 2.9, params


def test_presence_and_frequency_penalties_are_additive_on_generated_ids() -> None:
    """OpenAI's rule: ``logit -= count * frequency + (count > 0) * presence``, counting only the
    generated ids (the prompt's are the repetition penalty's business)."""
    logits = np.zeros(10, dtype=np.float32)
    logits[[2, 5, 7]] = [3.0, 2.5, 1.5]
    greedy = SamplingParams(temperature=0.0)
    assert Sampler(greedy).sample(logits, [2, 2], []) == 2  # prompt ids never count
    frequency = Sampler(SamplingParams(temperature=0.0, frequency_penalty=0.3))
    assert frequency.sample(logits, [2], [2]) == 2  # 3.0 - 0.3 > 2.5
    assert frequency.sample(logits, [2, 2], [2, 2]) == 5  # 3.0 - 0.6 < 2.5
    presence = Sampler(SamplingParams(temperature=0.0, presence_penalty=0.6))
    assert presence.sample(logits, [2, 2, 2], [2, 2, 2]) == 5  # once, whatever the count: 2.4 < 2.5
    rewarding = Sampler(SamplingParams(temperature=0.0, presence_penalty=-2.0))
    assert rewarding.sample(logits, [7], [7]) == 7  # negative values favour repeats: 1.5 + 2.0


def test_penalties_out_of_range_are_refused() -> None:
    """Both penalties take values in [-2, 2], as OpenAI's."""
    for name in ("presence_penalty", "frequency_penalty"):
        for value in (-2.5, 2.01):
            with pytest.raises(ValueError, match=name):
                SamplingParams(**{name: value}).validate()  # type: ignore[arg-type]
