"""KV reuse across chats of one owner, on the engine with a fake runner (no model at all).

The fake's output depends on every cached position and on how it was computed, so "equals
the recompute" below fails for a wrong copy, a stale position or a decode-mode position
shared before it was settled.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from service.config import EngineSettings
from service.engine.engine import Engine
from service.engine.prefix_index import common_prefix
from service.engine.tokenizer import ChatMessage, ChatTokenizer
from service.engine.types import ChatKey, FinishReason, GenerationResult, SamplingParams
from service.errors import QueueFull
from tests.engine.fake_runner import FakeRunner, byte_tokenizer

GREEDY = SamplingParams(temperature=0, max_tokens=12)
SYSTEM = "You are a careful assistant who answers in short, plain sentences. " * 3
TOKENIZER = byte_tokenizer()
BUSY_CONTEXT = 8192
BUSY = SamplingParams(temperature=0, max_tokens=8000)  # runs until cancelled


@asynccontextmanager
async def fake_engine(**overrides: Any) -> AsyncIterator[tuple[Engine, FakeRunner]]:
    settings = EngineSettings(**{"threads": 1, "kv_slots": 8, "max_context": 2048, **overrides})
    runner = FakeRunner(settings.kv_slots, settings.max_context, TOKENIZER)
    engine = Engine(runner, TOKENIZER, settings)
    await engine.start()
    try:
        yield engine, runner
    finally:
        await engine.close()


def ids(user: str, *, system: str = SYSTEM, tokenizer: ChatTokenizer = TOKENIZER) -> list[int]:
    messages: list[ChatMessage] = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    return tokenizer.prompt_ids(messages)


async def recompute(prompt: list[int], params: SamplingParams = GREEDY) -> GenerationResult:
    """The generation a fresh engine, with nothing cached, gives for ``prompt``."""
    async with fake_engine() as (engine, _):
        return await engine.submit(ChatKey("fresh/x"), prompt, params).result()


async def test_second_chat_of_an_owner_reuses_the_shared_system_prompt() -> None:
    """A new chat of the same owner starts from another chat's cache: exactly the shared
    prefix is reported and copied, and the reply equals a recompute."""
    first, second = ids("What is a prime number?"), ids("Name a colour.")
    shared = common_prefix(first, second, len(first))
    assert len(SYSTEM) < shared < len(second) - 2
    async with fake_engine() as (engine, runner):
        await engine.submit(ChatKey("alice/a"), first, GREEDY).result()
        await engine.wait_idle()
        computed_before = engine.stats.prefill_tokens
        stream = engine.submit(ChatKey("alice/b"), second, GREEDY)
        result = await stream.result()
        computed = engine.stats.prefill_tokens - computed_before
    assert stream.cached_tokens == result.cached_tokens == shared
    assert runner.copies[-1][2] == shared
    assert computed == len(second) - shared
    assert engine.stats.shared_tokens == shared
    assert result.token_ids == (await recompute(second)).token_ids


async def test_another_owner_never_reads_the_cache() -> None:
    """The same prompt under another owner reuses nothing (no copy) and gets the same reply."""
    prompt = ids("Name a colour.")
    async with fake_engine() as (engine, runner):
        mine = await engine.submit(ChatKey("alice/a"), prompt, GREEDY).result()
        await engine.wait_idle()
        stream = engine.submit(ChatKey("bob/a"), prompt, GREEDY)
        theirs = await stream.result()
    assert stream.cached_tokens == theirs.cached_tokens == 0
    assert not runner.copies
    assert engine.stats.shared_tokens == 0
    assert theirs.token_ids == mine.token_ids


@pytest.mark.parametrize("key", ["alice", "alice/", "alice/chat/with/slashes"])
async def test_the_owner_is_the_part_before_the_first_slash(key: str) -> None:
    """Keys of one owner share whatever follows the first slash; an owner named as a prefix of
    another owner's name ("alice" vs "alicex") shares nothing."""
    prompt = ids("Hello")
    async with fake_engine() as (engine, _):
        await engine.submit(ChatKey(key), prompt, GREEDY).result()
        await engine.wait_idle()
        same = await engine.submit(ChatKey("alice/other"), prompt, GREEDY).result()
        other = await engine.submit(ChatKey("alicex/other"), prompt, GREEDY).result()
    assert same.cached_tokens == len(prompt) - 2
    assert other.cached_tokens == 0


async def test_a_stateless_conversation_reuses_the_previous_request() -> None:
    """Requests under fresh keys that resend the whole conversation reuse the previous
    request's cache, its settled reply included, and continue as a recompute would."""
    params = SamplingParams(temperature=0, max_tokens=20)
    messages: list[ChatMessage] = [{"role": "user", "content": "Tell me something."}]
    async with fake_engine() as (engine, _):
        first_ids = TOKENIZER.prompt_ids(messages)
        first = await engine.submit(ChatKey("alice/api-1"), first_ids, params).result()
        await engine.wait_idle()  # the reply's decode-mode positions are settled
        messages += [
            {"role": "assistant", "content": first.text},
            {"role": "user", "content": "Go on."},
        ]
        second_ids = TOKENIZER.next_turn_ids(first_ids + first.token_ids, messages)
        second = await engine.submit(ChatKey("alice/api-2"), second_ids, params).result()
    # The last generated token was sampled but never fed: the cache ends one before it.
    assert second.cached_tokens == len(first_ids) + len(first.token_ids) - 1
    assert second.token_ids == (await recompute(second_ids, params)).token_ids


async def test_unsettled_decode_positions_are_never_shared() -> None:
    """While the engine is busy, a finished reply stays unsettled: a new chat reuses only the
    prompt-mode part of it, and still equals the recompute."""
    params = SamplingParams(temperature=0, max_tokens=20)
    messages: list[ChatMessage] = [{"role": "user", "content": "Tell me something."}]
    async with fake_engine(max_context=BUSY_CONTEXT) as (engine, _):
        busy = engine.submit(ChatKey("carol/busy"), ids("Keep going"), BUSY)
        await anext(aiter(busy))
        first_ids = TOKENIZER.prompt_ids(messages)
        first = await engine.submit(ChatKey("alice/api-1"), first_ids, params).result()
        messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "Go on."}]
        second_ids = TOKENIZER.next_turn_ids(first_ids + first.token_ids, messages)
        second = await engine.submit(ChatKey("alice/api-2"), second_ids, params).result()
        busy.cancel()
        assert (await busy.result()).reason is FinishReason.CANCELLED  # busy throughout
    assert second.cached_tokens == len(first_ids)
    assert second.token_ids == (await recompute(second_ids, params)).token_ids


async def test_a_running_chat_is_a_source_too() -> None:
    """A cache pinned by a running generation lends its prompt prefix to a new chat."""
    async with fake_engine(max_context=BUSY_CONTEXT) as (engine, _):
        running = engine.submit(ChatKey("alice/a"), ids("First question"), BUSY)
        await anext(aiter(running))
        prompt = ids("Second question")
        result = await engine.submit(ChatKey("alice/b"), prompt, GREEDY).result()
        running.cancel()
        assert (await running.result()).reason is FinishReason.CANCELLED
    assert result.cached_tokens == common_prefix(ids("First question"), prompt, len(prompt))
    assert result.token_ids == (await recompute(prompt)).token_ids


async def test_the_longest_prefix_wins_over_the_chats_own_cache() -> None:
    """A chat whose own cache shares less than another chat's gets the longer prefix."""
    long_system = SYSTEM + "Always cite a source."
    async with fake_engine() as (engine, _):
        await engine.submit(ChatKey("alice/own"), ids("Hi", system="Short."), GREEDY).result()
        await engine.submit(ChatKey("alice/other"), ids("Hi", system=long_system), GREEDY).result()
        await engine.wait_idle()
        prompt = ids("Hello", system=long_system)
        result = await engine.submit(ChatKey("alice/own"), prompt, GREEDY).result()
    assert result.cached_tokens == common_prefix(ids("Hi", system=long_system), prompt, len(prompt))
    assert result.token_ids == (await recompute(prompt)).token_ids


async def test_the_source_is_kept_when_a_slot_must_be_evicted() -> None:
    """With every slot taken, the least recently used cache is evicted unless it is the source
    about to be copied; then the next one goes."""
    async with fake_engine(kv_slots=2, max_batch=1) as (engine, _):
        await engine.submit(ChatKey("alice/a"), ids("Question one"), GREEDY).result()
        await engine.submit(ChatKey("bob/a"), ids("Question one"), GREEDY).result()
        await engine.wait_idle()
        prompt = ids("Question two")
        result = await engine.submit(ChatKey("alice/b"), prompt, GREEDY).result()
        bob_again = await engine.submit(ChatKey("bob/a"), ids("Question one"), GREEDY).result()
    assert result.cached_tokens == common_prefix(ids("Question one"), prompt, len(prompt))
    assert bob_again.cached_tokens == 0  # bob's cache was the one evicted
    assert result.token_ids == (await recompute(prompt)).token_ids


async def test_a_source_in_the_only_slot_is_evicted_and_the_prompt_recomputed() -> None:
    """With one slot, the source must make room: nothing is reused, the reply is still exact."""
    async with fake_engine(kv_slots=1, max_batch=1) as (engine, runner):
        await engine.submit(ChatKey("alice/a"), ids("Question one"), GREEDY).result()
        await engine.wait_idle()
        prompt = ids("Question two")
        result = await engine.submit(ChatKey("alice/b"), prompt, GREEDY).result()
    assert result.cached_tokens == 0
    assert not runner.copies
    assert engine.stats.evictions == 1
    assert result.token_ids == (await recompute(prompt)).token_ids


async def test_a_forgotten_or_budget_evicted_chat_lends_nothing() -> None:
    """Caches dropped by ``forget`` or by the memory budget are gone from the lookup."""
    system = "Be brief and kind, and answer every question."
    async with fake_engine(kv_budget_mb=1) as (engine, _):  # 128 positions of the fake
        first = ids("Question one", system=system)
        assert 64 < len(first) + GREEDY.max_tokens <= 128  # one cache fits the budget, two do not
        await engine.submit(ChatKey("alice/a"), first, GREEDY).result()
        await engine.wait_idle()
        engine.forget(ChatKey("alice/a"))
        forgotten = await engine.submit(
            ChatKey("alice/b"), ids("Question two", system=system), GREEDY
        ).result()
        await engine.wait_idle()
        await engine.submit(
            ChatKey("bob/a"), ids("Question two", system=system), GREEDY
        ).result()  # evicts alice/b
        evicted = await engine.submit(
            ChatKey("alice/c"), ids("Question three", system=system), GREEDY
        ).result()
    assert forgotten.cached_tokens == 0
    assert engine.stats.evictions >= 1
    assert evicted.cached_tokens == 0


async def test_batched_generations_on_the_fake_match_alone() -> None:
    """Batching is invisible in the output: generations decoded together match each alone."""
    prompts = [ids(text, system="Be brief.") for text in ("One", "A longer question about things", "Three")]
    params = SamplingParams(temperature=0, max_tokens=200)
    alone = [(await recompute(p, params)).token_ids for p in prompts]
    async with fake_engine(interleaved_chunk=4) as (engine, runner):
        streams = [engine.submit(ChatKey(f"u{i}/c"), p, params) for i, p in enumerate(prompts)]
        together = [(await s.result()).token_ids for s in streams]
    assert together == alone
    assert max(batch for _, batch, _ in runner.forwards) == len(prompts)


# ---- forks: one prompt, n generations --------------------------------------------------------

SEEDED = [SamplingParams(temperature=1.0, seed=seed, max_tokens=12) for seed in (1, 2, 3)]


async def test_a_fork_prefills_its_prompt_once_and_each_choice_equals_its_own_run() -> None:
    """``submit_fork`` computes the prompt once, copies it into the other slots, and every choice
    gives what a lone generation with its params gives."""
    prompt = ids("Write three words.")
    async with fake_engine() as (engine, runner):
        streams = engine.submit_fork([ChatKey(f"alice/api-{i}") for i in range(3)], prompt, SEEDED)
        results = [await s.result() for s in streams]
    assert engine.stats.prefill_tokens == len(prompt)
    assert [length for _, _, length in runner.copies] == [len(prompt)] * 2
    assert engine.stats.forked_tokens == 2 * len(prompt)
    assert {s.cached_tokens for s in streams} == {r.cached_tokens for r in results} == {0}
    alone = [(await recompute(prompt, p)).token_ids for p in SEEDED]
    assert [r.token_ids for r in results] == alone
    assert len({tuple(t) for t in alone}) == 3  # the seeds differ: so do the choices


async def test_fork_followers_admitted_after_the_leader_ended_still_copy_its_prompt() -> None:
    """With room for one generation at a time, the followers start after the leader finished,
    from its cache and kept logits, and still equal their own runs."""
    prompt = ids("Write three words.")
    async with fake_engine(max_batch=1) as (engine, runner):
        streams = engine.submit_fork([ChatKey(f"alice/api-{i}") for i in range(3)], prompt, SEEDED)
        results = [await s.result() for s in streams]
    assert engine.stats.prefill_tokens == len(prompt)
    assert [length for _, _, length in runner.copies] == [len(prompt)] * 2
    assert [r.token_ids for r in results] == [(await recompute(prompt, p)).token_ids for p in SEEDED]


async def test_fork_followers_of_a_cancelled_leader_prefill_on_their_own() -> None:
    """A leader cancelled before its prefill leaves the followers to compute the prompt alone,
    with the same results."""
    prompt = ids("Write three words.")
    async with fake_engine(max_batch=1, max_context=BUSY_CONTEXT) as (engine, _):
        blocker = engine.submit(ChatKey("bob/x"), ids("Hold on"), BUSY)
        await anext(aiter(blocker))
        streams = engine.submit_fork([ChatKey(f"alice/api-{i}") for i in range(3)], prompt, SEEDED)
        streams[0].cancel()
        assert (await streams[0].result()).completion_tokens == 0
        blocker.cancel()
        results = [await s.result() for s in streams[1:]]
    assert [r.token_ids for r in results] == [(await recompute(prompt, p)).token_ids for p in SEEDED[1:]]


async def test_a_fork_is_refused_whole() -> None:
    """Mixed owners, mismatched lengths and a queue without room for all raise before anything runs."""
    prompt = ids("Hi")
    async with fake_engine(max_batch=1, max_waiting=2, max_context=BUSY_CONTEXT) as (engine, _):
        with pytest.raises(ValueError, match="owner"):
            engine.submit_fork([ChatKey("alice/a"), ChatKey("bob/a")], prompt, [GREEDY, GREEDY])
        with pytest.raises(ValueError, match="one params per key"):
            engine.submit_fork([ChatKey("alice/a")], prompt, [GREEDY, GREEDY])
        running = engine.submit(ChatKey("bob/x"), ids("Hold on"), BUSY)
        await anext(aiter(running))
        with pytest.raises(QueueFull):
            engine.submit_fork([ChatKey(f"alice/{i}") for i in range(3)], prompt, [GREEDY] * 3)
        assert engine.stats.waiting == 0
        running.cancel()
        await running.result()
