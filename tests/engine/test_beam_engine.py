"""Beam search in the engine, on the tiny model: greedy at width 1, the winner of an independent
search that recomputes every hypothesis without the engine's cache sharing, an early-streamed
prefix that starts the answer, rows in the shared decode steps, and cancel within one step."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from service.config import EngineSettings
from service.engine.beam import ScorerName, log_softmax, score
from service.engine.beam_group import BeamGroup
from service.engine.engine import Engine, GenerationStream
from service.engine.loader import load_engine
from service.engine.models.registry import PreparedModel
from service.engine.runner import Runner
from service.engine.sampling import Sampler
from service.engine.sequence import Sequence
from service.engine.stopping import StopMatcher
from service.engine.tokenizer import ChatTokenizer
from service.engine.types import BeamResult, ChatKey, Delta, FinishReason, GenerationId, SamplingParams
from service.errors import InvalidParams
from tests.engine.conftest import EngineFactory

SETTINGS = {"threads": 2, "kv_slots": 16, "max_context": 256}


def prompt(engine: Engine, text: str) -> list[int]:
    return engine.tokenizer.prompt_ids([{"role": "user", "content": text}])


async def collect(stream: GenerationStream) -> tuple[list[Delta], BeamResult]:
    deltas = [d async for d in stream]
    result = await stream.result()
    assert isinstance(result, BeamResult)
    return deltas, result


class Reference:
    """A naive beam search over the same model, independent of the engine: every hypothesis's
    next-token logits are recomputed from scratch in a scratch slot (the prompt in one prefill,
    then its tokens one decode step each, as the engine computes them), every continuation of
    every beam is scored, sorted and walked in plain Python."""

    def __init__(self, runner: Runner, prompt_ids: list[int], eos: frozenset[int]) -> None:
        self.runner, self.prompt, self.eos = runner, prompt_ids, eos

    def logprobs(self, tokens: tuple[int, ...]) -> np.ndarray:
        runner, n = self.runner, len(self.prompt)
        logits = runner.forward(0, np.asarray([self.prompt], dtype=np.int64), [0])
        for i, token in enumerate(tokens):
            logits = runner.forward(0, np.asarray([[token]], dtype=np.int64), [n + i])
        return log_softmax(logits[0:1])[0]

    def search(self, width: int, max_tokens: int, scorer: ScorerName) -> list[tuple[tuple[int, ...], float]]:
        live: list[tuple[tuple[int, ...], float]] = [((), 0.0)]
        finished: list[tuple[tuple[int, ...], float]] = []
        while live:
            totals = np.stack([logprob + self.logprobs(tokens) for tokens, logprob in live])
            parents, ids = np.indices(totals.shape)
            order = np.lexsort((ids.ravel(), parents.ravel(), -totals.ravel()))  # best, then lower ids
            candidates = [(-totals.flat[i], int(parents.flat[i]), int(ids.flat[i])) for i in order[:64]]
            children: list[tuple[tuple[int, ...], float]] = []
            ended = 0
            for negative, parent, token in candidates:
                tokens = (*live[parent][0], token)
                if token in self.eos or len(tokens) >= max_tokens:
                    finished.append((tokens, -negative))
                    ended += 1
                else:
                    children.append((tokens, -negative))
                if len(children) == width or ended == width:
                    break
            normalised = scorer == "length_normalised"
            finished.sort(
                key=lambda h: -(h[1] / len(h[0]) if normalised else h[1])
            )  # stable: ties to the first
            del finished[width:]
            best = None if not finished else finished[0][1] / (len(finished[0][0]) if normalised else 1)
            live = [c for c in children if best is None or c[1] / (max_tokens if normalised else 1) > best]
        return finished


@pytest.fixture(scope="module")
def reference_runner(tiny_model: PreparedModel) -> Runner:
    """A second runner on the tiny model, never started as an engine: the reference's own."""
    runner = load_engine(tiny_model, EngineSettings(**SETTINGS)).runner
    assert isinstance(runner, Runner)
    return runner


async def test_width_one_is_greedy_decoding(tiny_engine: EngineFactory) -> None:
    """A beam of width 1 gives greedy decoding's tokens and text, token for token."""
    params = SamplingParams(temperature=0, max_tokens=12)
    async with tiny_engine(**SETTINGS) as engine:
        ids = prompt(engine, "Name three rivers.")
        greedy = await engine.submit(ChatKey("u/g"), ids, params).result()
        deltas, beam = await collect(engine.submit_beam(ChatKey("u/b"), ids, params, 1))
    assert beam.token_ids == greedy.token_ids
    assert beam.text == greedy.text
    assert beam.reason is greedy.reason
    # With one beam every token is agreed as soon as it is chosen; the last one ends the search.
    assert beam.streamed_early == len(beam.token_ids) - 1
    assert "".join(d.text for d in deltas) + beam.tail == beam.text


@pytest.mark.parametrize(("width", "scorer"), [(3, "logprob"), (4, "length_normalised")])
async def test_the_winner_is_the_reference_searchs_best(
    tiny_engine: EngineFactory, reference_runner: Runner, width: int, scorer: ScorerName
) -> None:
    """Width 3 and 4: the engine's candidates, their scores and the winner are those of the naive
    reference search, and the winner is the candidate with the highest score."""
    max_tokens = 5
    async with tiny_engine(**SETTINGS) as engine:
        ids = prompt(engine, "Why is the sky blue?")
        params = SamplingParams(max_tokens=max_tokens)
        _, result = await collect(engine.submit_beam(ChatKey("u/b"), ids, params, width, scorer=scorer))
        eos = engine.tokenizer.eos_token_ids
    expected = Reference(reference_runner, ids, eos).search(width, max_tokens, scorer)
    assert [c.token_ids for c in result.candidates] == [list(tokens) for tokens, _ in expected]
    for candidate, (tokens, logprob) in zip(result.candidates, expected, strict=True):
        assert candidate.logprob == pytest.approx(logprob, abs=1e-3)
        assert candidate.score == pytest.approx(score(scorer, logprob, len(tokens)), abs=1e-3)
    assert result.scorer == scorer
    assert result.token_ids == result.candidates[0].token_ids
    assert result.candidates[0].score == max(c.score for c in result.candidates)


async def test_the_early_prefix_starts_the_final_answer(tiny_engine: EngineFactory) -> None:
    """Tokens streamed while the search runs are a prefix of the winner: the deltas' text starts
    the final text, their tokens add up to ``streamed_early``, and the tail completes it."""
    async with tiny_engine(**SETTINGS) as engine:
        ids = prompt(engine, "Bonjour")
        deltas, result = await collect(
            engine.submit_beam(ChatKey("u/b"), ids, SamplingParams(max_tokens=10), 2)
        )
    early = "".join(d.text for d in deltas)
    assert result.streamed_early > 0
    assert result.streamed_early < len(result.token_ids)
    assert sum(d.tokens for d in deltas) == result.streamed_early
    assert [d.index for d in deltas] == starts([d.tokens for d in deltas])
    assert result.text.startswith(early)
    assert early + result.tail == result.text
    assert result.text == engine.tokenizer.decode(result.token_ids, skip_special_tokens=True)


def starts(counts: list[int]) -> list[int]:
    """Start index of each delta: the tokens covered before it."""
    out, total = [], 0
    for count in counts:
        out.append(total)
        total += count
    return out


async def test_beams_decode_in_the_shared_batched_steps(tiny_engine: EngineFactory) -> None:
    """A width-3 search beside a running chat: its three beams and the chat run in the same decode
    steps (four rows in a step), and the prompt was prefilled once."""
    async with tiny_engine(**SETTINGS) as engine:
        chat = engine.submit(
            ChatKey("v/chat"), prompt(engine, "Count"), SamplingParams(temperature=0, max_tokens=200)
        )
        await anext(chat)  # the chat is decoding
        prefilled = engine.stats.prefill_tokens
        ids = prompt(engine, "Why is the sky blue?")
        _, result = await collect(engine.submit_beam(ChatKey("u/b"), ids, SamplingParams(max_tokens=6), 3))
        stats = engine.stats
        assert stats.max_decode_batch == 4
        assert stats.beam_rows == 3 * (result.steps - 1)  # the first step's logits are the prefill's
        assert stats.prefill_tokens - prefilled == len(ids)
        assert chat.generated_tokens < 200  # still running: the steps were shared, not sequential
        chat.cancel()
        await chat.result()


async def test_width_past_the_batch_is_refused(tiny_engine: EngineFactory) -> None:
    async with tiny_engine(**SETTINGS, max_batch=4) as engine:
        with pytest.raises(InvalidParams, match="beam_width"):
            engine.submit_beam(ChatKey("u/b"), prompt(engine, "Hi"), SamplingParams(max_tokens=4), 5)


class _Gate:
    """Lets ``runs`` model runs through, then holds the next one until released; says when it holds."""

    def __init__(self, runs: int) -> None:
        self.runs = runs
        self.holding = threading.Event()
        self.released = threading.Event()

    def wrap(self, forward: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
        def gated(*args: Any) -> np.ndarray:
            if self.runs == 0:
                self.holding.set()
                self.released.wait(60)
            self.runs -= 1
            return forward(*args)

        return gated


async def test_cancel_ends_the_whole_search_within_one_step(
    tiny_engine: EngineFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled while the model runs its fifth step, the search ends after that step: no further
    model run, every slot released, the result cancelled."""
    async with tiny_engine(**SETTINGS) as engine:
        gate = _Gate(runs=4)  # the prefill and three decode steps
        monkeypatch.setattr(engine.runner, "forward", gate.wrap(engine.runner.forward))
        ids = prompt(engine, "Count")
        stream = engine.submit_beam(ChatKey("u/b"), ids, SamplingParams(max_tokens=200), 3)
        assert await asyncio.to_thread(gate.holding.wait, 60)
        stream.cancel()
        gate.released.set()
        _, result = await collect(stream)
        await engine.wait_idle()
        assert result.reason is FinishReason.CANCELLED
        assert engine.stats.decode_steps == 4  # three, and the one the cancel came in; no more
        assert result.steps == 5  # the first token came from the prefill's logits
        assert engine.stats.running == 0
        assert engine.stats.resident_tokens <= len(ids) + 5  # only the chat key's cache stays


# ---- the streamed text of a search (BeamGroup), driven token by token ------------------------------


def forced_group(tokenizer: ChatTokenizer, stops: tuple[str, ...], max_tokens: int) -> BeamGroup:
    params = SamplingParams(max_tokens=max_tokens)
    leader = Sequence(
        id=GenerationId(1),
        chat=ChatKey("u/b"),
        prompt=[1, 2, 3],
        params=params,
        sampler=Sampler(params),
        detokenizer=tokenizer.detokenizer(),
        stop=StopMatcher(stops),
        eos_ids=tokenizer.eos_token_ids,
        max_len=256,
    )
    return BeamGroup.create([leader], tokenizer, stops, width=1, max_tokens=max_tokens, scorer="logprob")


def drive(group: BeamGroup, tokens: list[int]) -> list[Delta]:
    """Make width 1 choose ``tokens`` in turn, streaming as the engine does: no early delta from
    the step that ends the search."""
    deltas = []
    for token in tokens:
        row = np.full((1, group.tokenizer.vocab_size), -20.0, dtype=np.float32)
        row[0, token] = 20.0
        if group.search.step(row).over:
            break
        if (delta := group.advance()) is not None:
            deltas.append(delta)
    return deltas


def test_a_character_split_across_tokens_is_held_back(tiny_model: PreparedModel) -> None:
    """The three byte tokens of one character stream as one delta once the last arrives."""
    tokenizer = ChatTokenizer.from_dir(tiny_model.directory)
    text = "A 🦩 and 鬱"
    tokens = tokenizer.encode(text)
    group = forced_group(tokenizer, (), max_tokens=50)
    deltas = drive(group, [*tokens, min(tokenizer.eos_token_ids)])
    result = group.result(None)
    assert all("\ufffd" not in d.text for d in deltas)
    assert [d.text for d in deltas][:3] == ["A", " 🦩", " and"]
    assert deltas[1].tokens == 3
    assert "".join(d.text for d in deltas) + result.tail == result.text == text
    assert result.streamed_early == sum(d.tokens for d in deltas) == len(tokens)


def test_a_stop_string_ends_the_winner_and_is_never_streamed(tiny_model: PreparedModel) -> None:
    """A base model's turn stop: text that may start it is held back, the beam ends on it with
    reason stop, and the answer is cut before it."""
    tokenizer = ChatTokenizer.from_dir(tiny_model.directory)
    group = forced_group(tokenizer, ("\nUser:",), max_tokens=50)
    deltas = drive(group, tokenizer.encode("Paris.\nUser: hi"))
    result = group.result(None)
    assert "".join(d.text for d in deltas) == "Paris."
    assert result.text == "Paris."
    assert result.reason is FinishReason.STOP
    assert result.candidates[0].text == "Paris."
