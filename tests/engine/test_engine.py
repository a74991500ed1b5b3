"""The engine on real ONNX models: streaming, exact KV reuse, batching, cancellation, limits."""

from __future__ import annotations

import pytest

from service.engine.engine import Engine, GenerationStream
from service.engine.prefix_index import common_prefix
from service.engine.tokenizer import ChatMessage
from service.engine.types import ChatKey, Delta, FinishReason, GenerationResult, SamplingParams
from service.errors import ContextOverflow, QueueFull
from tests.engine.conftest import EngineFactory

GREEDY = SamplingParams(temperature=0, max_tokens=24)


SYSTEM = (
    "You are a patient assistant for a small bakery. Answer questions about bread, opening hours "
    "and orders in plain, friendly sentences, and say so when you do not know."
)


def prompt(engine: Engine, text: str) -> list[int]:
    return engine.tokenizer.prompt_ids([{"role": "user", "content": text}])


def with_system(engine: Engine, text: str) -> list[int]:
    return engine.tokenizer.prompt_ids(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]
    )


async def collect(stream: GenerationStream) -> tuple[list[Delta], GenerationResult]:
    deltas = [delta async for delta in stream]
    return deltas, await stream.result()


def second_turn_ids(
    engine: Engine, first_ids: list[int], first: str, reply: GenerationResult, second: str
) -> list[int]:
    """The prompt of the second turn, continuing exactly the ids the first turn consumed."""
    messages: list[ChatMessage] = [
        {"role": "user", "content": first},
        {"role": "assistant", "content": reply.text},
        {"role": "user", "content": second},
    ]
    return engine.tokenizer.next_turn_ids(first_ids + reply.token_ids, messages)


async def two_turns(
    engine: Engine, chat: str, first: str, second: str, params: SamplingParams
) -> tuple[GenerationResult, GenerationResult]:
    ids = prompt(engine, first)
    turn1 = await engine.submit(ChatKey(chat), ids, params).result()
    ids2 = second_turn_ids(engine, ids, first, turn1, second)
    await engine.wait_idle()  # the first turn's cache is settled: exact for reuse
    return turn1, await engine.submit(ChatKey(chat), ids2, params).result()


def settled_length(turn1: GenerationResult) -> int:
    """What a settled first turn leaves cached: its prompt and reply, but the reply's last
    token, which was sampled and never fed to the model."""
    return turn1.prompt_tokens + turn1.completion_tokens - 1


async def test_stream_deltas_concatenate_to_the_result(tiny_engine: EngineFactory) -> None:
    """Deltas arrive in order with contiguous indexes and add up to the final text."""
    async with tiny_engine() as engine:
        deltas, result = await collect(engine.submit(ChatKey("a"), prompt(engine, "Hello"), GREEDY))
    assert "".join(d.text for d in deltas) == result.text
    expected_index = 0
    for delta in deltas:
        assert delta.index == expected_index
        expected_index += delta.tokens
    assert result.reason is FinishReason.LENGTH
    assert result.completion_tokens == len(result.token_ids) == GREEDY.max_tokens
    assert result.prompt_tokens == len(prompt(engine, "Hello"))
    assert result.ttft_ms is not None
    assert result.ttft_ms > 0


@pytest.mark.parametrize("chunk", [2, 5, 512])
async def test_cached_turn_equals_recompute(tiny_engine: EngineFactory, chunk: int) -> None:
    """A second turn served from the chat's cache gives the tokens a cold recompute gives."""
    async with tiny_engine(prefill_chunk=chunk, interleaved_chunk=chunk) as engine:
        warm_turn1, warm = await two_turns(engine, "warm", "Hi there", "Tell me more", GREEDY)
    async with tiny_engine(prefill_chunk=chunk) as engine:
        ids = prompt(engine, "Hi there")
        turn1 = await engine.submit(ChatKey("cold"), ids, GREEDY).result()
        ids2 = second_turn_ids(engine, ids, "Hi there", turn1, "Tell me more")
        cold = await engine.submit(ChatKey("other-chat"), ids2, GREEDY).result()
    assert warm.cached_tokens == settled_length(warm_turn1) > len(ids)
    assert cold.cached_tokens == 0
    assert warm.token_ids == cold.token_ids


@pytest.mark.parametrize("chunk", [2, 5, 512])
async def test_a_chat_reuses_another_chats_system_prompt_exactly(
    tiny_engine: EngineFactory, chunk: int
) -> None:
    """Two chats of one owner with one long system prompt: the second copies exactly the shared
    prefix from the first's cache and continues as a recompute does."""
    async with tiny_engine(prefill_chunk=chunk, interleaved_chunk=chunk) as engine:
        first, second = (with_system(engine, text) for text in ("Hi there", "Tell me a joke"))
        await engine.submit(ChatKey("u1/a"), first, GREEDY).result()
        await engine.wait_idle()
        stream = engine.submit(ChatKey("u1/b"), second, GREEDY)
        reused = await stream.result()
    async with tiny_engine() as engine:
        cold = await engine.submit(ChatKey("u1/b"), second, GREEDY).result()
    shared = common_prefix(first, second, len(second))
    assert shared > len(engine.tokenizer.encode(SYSTEM))
    assert stream.cached_tokens == reused.cached_tokens == shared
    assert cold.cached_tokens == 0
    assert reused.token_ids == cold.token_ids


async def test_a_stateless_request_reuses_the_previous_request_of_its_owner(
    tiny_engine: EngineFactory,
) -> None:
    """A conversation resent whole under a fresh key (as the HTTP API does) reuses the previous
    request's settled cache and continues as a recompute does."""
    async with tiny_engine() as engine:
        ids = prompt(engine, "Hi there")
        turn1 = await engine.submit(ChatKey("u1/api-1"), ids, GREEDY).result()
        ids2 = second_turn_ids(engine, ids, "Hi there", turn1, "Tell me more")
        await engine.wait_idle()
        resent = await engine.submit(ChatKey("u1/api-2"), ids2, GREEDY).result()
    async with tiny_engine() as engine:
        cold = await engine.submit(ChatKey("u1/api-3"), ids2, GREEDY).result()
    assert resent.cached_tokens == settled_length(turn1)
    assert cold.cached_tokens == 0
    assert resent.token_ids == cold.token_ids


async def test_evicted_chat_reprefills_to_the_same_continuation(tiny_engine: EngineFactory) -> None:
    """With room for one chat, a chat pushed out of the cache continues exactly as if cached."""
    async with tiny_engine(kv_slots=1, max_batch=1) as engine:
        ids = prompt(engine, "Once upon a time")
        turn1 = await engine.submit(ChatKey("a"), ids, GREEDY).result()
        await engine.submit(ChatKey("b"), prompt(engine, "Unrelated"), GREEDY).result()
        ids2 = second_turn_ids(engine, ids, "Once upon a time", turn1, "Go on")
        evicted = await engine.submit(ChatKey("a"), ids2, GREEDY).result()
        assert engine.stats.evictions >= 1
    async with tiny_engine() as engine:
        warm_turn1, warm = await two_turns(engine, "a", "Once upon a time", "Go on", GREEDY)
    assert evicted.cached_tokens == 0
    assert warm.cached_tokens == settled_length(warm_turn1)
    assert evicted.token_ids == warm.token_ids


async def test_batched_generation_matches_alone(tiny_engine: EngineFactory) -> None:
    """A generation decoded in one batch with others yields the tokens it yields alone."""
    texts = ["Alpha", "A much longer prompt about the weather in the mountains", "Gamma", "Delta delta", "E"]
    async with tiny_engine() as engine:
        alone = [
            (await engine.submit(ChatKey(f"solo{i}"), prompt(engine, t), GREEDY).result()).token_ids
            for i, t in enumerate(texts)
        ]
    async with tiny_engine(interleaved_chunk=4) as engine:
        streams = [
            engine.submit(ChatKey(f"batch{i}"), prompt(engine, t), GREEDY) for i, t in enumerate(texts)
        ]
        together = [(await s.result()).token_ids for s in streams]
        assert engine.stats.decode_steps < sum(len(t) for t in together)  # decode steps were shared
    assert together == alone


async def test_a_lone_decoder_decodes_where_it_prefilled(tiny_engine: EngineFactory) -> None:
    """With another chat's cache resident in slot 0, a new chat decodes in its own slot: no
    cache is swapped (which would delay its tokens), and its tokens are those of a cold engine."""
    async with tiny_engine() as engine:
        await engine.submit(ChatKey("u1/long"), prompt(engine, "A long story " * 20), GREEDY).result()
        await engine.wait_idle()
        ids = prompt(engine, "Another question")
        result = await engine.submit(ChatKey("u1/next"), ids, GREEDY).result()
        assert engine.stats.slot_moves == 0
    async with tiny_engine() as engine:
        cold = await engine.submit(ChatKey("u1/cold"), ids, GREEDY).result()
    assert result.token_ids == cold.token_ids


async def test_cancel_stops_within_one_step(tiny_engine: EngineFactory) -> None:
    """After cancel, at most one more token is produced and the reason is cancelled."""
    async with tiny_engine() as engine:
        stream = engine.submit(
            ChatKey("c"), prompt(engine, "Count"), SamplingParams(temperature=0, max_tokens=500)
        )
        received = 0
        async for delta in stream:
            received += delta.tokens
            if received >= 3:
                at_cancel = stream.generated_tokens
                stream.cancel()
                break
        result = await stream.result()
    assert result.reason is FinishReason.CANCELLED
    assert result.completion_tokens <= at_cancel + 1
    assert result.completion_tokens < 500


async def test_cancel_while_waiting_never_starts(tiny_engine: EngineFactory) -> None:
    """A queued generation cancelled before admission ends cancelled with no tokens."""
    async with tiny_engine(max_batch=1) as engine:
        running = engine.submit(
            ChatKey("r"), prompt(engine, "One"), SamplingParams(temperature=0, max_tokens=200)
        )
        queued = engine.submit(ChatKey("q"), prompt(engine, "Two"), GREEDY)
        assert queued.queue_position >= 1
        queued.cancel()
        result = await queued.result()
        running.cancel()
        await running.result()
    assert result.reason is FinishReason.CANCELLED
    assert result.completion_tokens == 0


async def test_seeded_sampling_is_reproducible(tiny_engine: EngineFactory) -> None:
    """The same seed gives the same tokens; another seed gives other tokens."""
    params = SamplingParams(temperature=1.0, top_p=0.95, top_k=50, seed=1234, max_tokens=32)
    async with tiny_engine() as engine:
        ids = prompt(engine, "Sample me")
        first = await engine.submit(ChatKey("s1"), ids, params).result()
        second = await engine.submit(ChatKey("s2"), ids, params).result()
        other = await engine.submit(
            ChatKey("s3"), ids, SamplingParams(temperature=1.0, seed=99, max_tokens=32)
        ).result()
    assert first.token_ids == second.token_ids
    assert other.token_ids != first.token_ids


async def test_stop_string_ends_the_reply_before_it(tiny_engine: EngineFactory) -> None:
    """A stop string cuts the reply just before it, with reason stop."""
    async with tiny_engine() as engine:
        ids = prompt(engine, "Stop test")
        free = await engine.submit(ChatKey("f"), ids, SamplingParams(temperature=0, max_tokens=40)).result()
        cut = len(free.text) // 2
        stop = free.text[cut : cut + 3]
        assert stop.strip()
        stopped = await engine.submit(
            ChatKey("g"), ids, SamplingParams(temperature=0, max_tokens=40, stop=(stop,))
        ).result()
    assert stopped.reason is FinishReason.STOP
    assert stopped.text == free.text[: free.text.index(stop)]


async def test_queue_bound_rejects_with_queue_full(tiny_engine: EngineFactory) -> None:
    """Past max_batch running and max_waiting queued, submit raises QueueFull."""
    long = SamplingParams(temperature=0, max_tokens=400)
    async with tiny_engine(max_batch=1, max_waiting=2) as engine:
        ids = prompt(engine, "Queue")
        accepted = [engine.submit(ChatKey("q0"), ids, long)]
        await anext(aiter(accepted[0]))  # the first one is running: the queue is empty
        accepted += [engine.submit(ChatKey(f"q{i}"), ids, long) for i in (1, 2)]
        with pytest.raises(QueueFull):
            engine.submit(ChatKey("q3"), ids, long)
        assert [s.queue_position for s in accepted] == [0, 1, 2]
        for stream in accepted:
            stream.cancel()
        results = [await s.result() for s in accepted]
    assert all(r.reason is FinishReason.CANCELLED for r in results)


async def test_prompt_longer_than_context_is_refused(tiny_engine: EngineFactory) -> None:
    """A prompt that leaves no room for a token raises ContextOverflow before anything starts."""
    async with tiny_engine(max_context=64) as engine:
        with pytest.raises(ContextOverflow):
            engine.submit(ChatKey("long"), prompt(engine, "word " * 100), GREEDY)
        result = await engine.submit(
            ChatKey("fits"), prompt(engine, "short"), SamplingParams(temperature=0, max_tokens=500)
        ).result()
    assert result.reason is FinishReason.LENGTH
    assert result.prompt_tokens + result.completion_tokens == 64


async def test_bad_params_are_refused(tiny_engine: EngineFactory) -> None:
    """Out-of-range sampling parameters raise ValueError naming the field."""
    async with tiny_engine() as engine:
        with pytest.raises(ValueError, match="top_p"):
            engine.submit(ChatKey("p"), prompt(engine, "x"), SamplingParams(top_p=0.0))


# ---- the real default model ---------------------------------------------------------------


@pytest.mark.slow
async def test_default_model_cached_turn_equals_recompute(default_engine: EngineFactory) -> None:
    """On SmolLM2 (int8), a cached second turn and a cold recompute give identical greedy tokens."""
    params = SamplingParams(temperature=0, max_tokens=48)
    async with default_engine() as engine:
        warm_turn1, warm = await two_turns(
            engine, "warm", "What is the capital of France?", "And of Italy?", params
        )
    async with default_engine(prefill_chunk=7) as engine:
        ids = prompt(engine, "What is the capital of France?")
        turn1 = await engine.submit(ChatKey("t1"), ids, params).result()
        ids2 = second_turn_ids(engine, ids, "What is the capital of France?", turn1, "And of Italy?")
        cold = await engine.submit(ChatKey("cold"), ids2, params).result()
    assert warm.cached_tokens == settled_length(warm_turn1)
    assert cold.cached_tokens == 0
    assert warm.token_ids == cold.token_ids


@pytest.mark.slow
async def test_default_model_reuses_another_chats_system_prompt_exactly(
    default_engine: EngineFactory,
) -> None:
    """On SmolLM2 (int8), a chat starting from another chat's system prompt cache gives the
    greedy tokens of a recompute."""
    params = SamplingParams(temperature=0, max_tokens=48)
    async with default_engine() as engine:
        first, second = (with_system(engine, text) for text in ("Name a fruit.", "Write a haiku about rain."))
        await engine.submit(ChatKey("u1/a"), first, params).result()
        await engine.wait_idle()
        reused = await engine.submit(ChatKey("u1/b"), second, params).result()
    async with default_engine(prefill_chunk=7) as engine:
        cold = await engine.submit(ChatKey("u2/b"), second, params).result()
    assert reused.cached_tokens == common_prefix(first, second, len(second)) > 40
    assert cold.cached_tokens == 0
    assert reused.token_ids == cold.token_ids


@pytest.mark.slow
async def test_default_model_batched_matches_alone(default_engine: EngineFactory) -> None:
    """On SmolLM2, four generations batched together match each one run alone."""
    texts = ["Name a fruit.", "Write a haiku about rain.", "What is 2+2?", "Say hello in French."]
    params = SamplingParams(temperature=0, max_tokens=32)
    async with default_engine() as engine:
        alone = [
            (await engine.submit(ChatKey(f"a{i}"), prompt(engine, t), params).result()).token_ids
            for i, t in enumerate(texts)
        ]
        streams = [engine.submit(ChatKey(f"b{i}"), prompt(engine, t), params) for i, t in enumerate(texts)]
        together = [(await s.result()).token_ids for s in streams]
    assert together == alone


@pytest.mark.slow
@pytest.mark.parametrize(
    ("request_text", "script"),
    [("Reply with three emoji that describe happiness.", "emoji"), ("请用中文介绍一下北京。", "cjk")],
)
async def test_default_model_streams_multibyte_text_intact(
    default_engine: EngineFactory, request_text: str, script: str
) -> None:
    """Emoji and CJK arrive whole: held-back bytes ride in multi-token deltas, never U+FFFD."""
    async with default_engine() as engine:
        deltas, result = await collect(
            engine.submit(
                ChatKey(script), prompt(engine, request_text), SamplingParams(temperature=0, max_tokens=41)
            )
        )
    assert "".join(d.text for d in deltas) == result.text
    assert all("\ufffd" not in d.text for d in deltas)
    assert any(d.tokens > 1 and any(ord(c) > 0x2E7F for c in d.text) for d in deltas)
    assert not result.text.endswith("\ufffd")


async def test_long_prompt_prefills_in_chunks_between_decode_steps(tiny_engine: EngineFactory) -> None:
    """While a long prompt prefills, a running generation keeps getting a token per chunk."""
    chunk = 8
    async with tiny_engine(interleaved_chunk=chunk) as engine:
        running = engine.submit(
            ChatKey("running"), prompt(engine, "Hi"), SamplingParams(temperature=0, max_tokens=200)
        )
        await anext(aiter(running))
        long_prompt = prompt(engine, "lorem ipsum " * 35)
        before = running.generated_tokens
        newcomer = engine.submit(ChatKey("long"), long_prompt, SamplingParams(temperature=0, max_tokens=4))
        await anext(aiter(newcomer))
        during = running.generated_tokens - before
        running.cancel()
        await running.result()
        await newcomer.result()
    assert len(long_prompt) > 10 * chunk
    assert during >= len(long_prompt) // chunk - 1


async def test_a_fork_gives_each_choice_what_a_lone_run_gives(tiny_engine: EngineFactory) -> None:
    """``submit_fork``: one prefill for three seeded choices, each equal to its lone generation."""
    params = [SamplingParams(temperature=1.0, top_k=50, seed=seed, max_tokens=16) for seed in (7, 8, 9)]
    async with tiny_engine() as engine:
        ids = with_system(engine, "Name three rivers.")
        streams = engine.submit_fork([ChatKey(f"u1/n{i}") for i in range(3)], ids, params)
        forked = [(await s.result()).token_ids for s in streams]
        assert engine.stats.prefill_tokens == len(ids)
        assert engine.stats.forked_tokens == 2 * len(ids)
    async with tiny_engine() as engine:
        alone = [
            (await engine.submit(ChatKey(f"u{i}/x"), ids, p).result()).token_ids for i, p in enumerate(params)
        ]
    assert forked == alone


async def test_a_batch_is_queued_all_or_none(tiny_engine: EngineFactory) -> None:
    """``submit_batch``: more prompts than the queue holds queue none of them; a batch that fits
    answers each prompt as a lone run does, in the order given."""
    short = SamplingParams(temperature=0, max_tokens=6)
    async with tiny_engine(max_batch=2, max_waiting=2) as engine:
        ids = [prompt(engine, text) for text in ("North", "A longer prompt for the south", "East")]
        with pytest.raises(QueueFull):
            engine.submit_batch([ChatKey(f"u/b{i}") for i in range(3)], ids, [short] * 3)
        assert engine.stats.waiting == 0
        with pytest.raises(ValueError, match="one prompt"):
            engine.submit_batch([ChatKey("u/b0")], ids[:2], [short])
        streams = engine.submit_batch([ChatKey(f"u/b{i}") for i in range(2)], ids[:2], [short] * 2)
        batched = [await s.result() for s in streams]
        alone = [await engine.submit(ChatKey(f"u/a{i}"), p, short).result() for i, p in enumerate(ids[:2])]
    assert [r.prompt_tokens for r in batched] == [len(p) for p in ids[:2]]
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
