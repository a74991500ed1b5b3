"""The scheduling policy: FIFO admission, queue positions, prefill/decode alternation."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from service.engine.kv_cache import CacheEntry, chunk_end
from service.engine.sampling import Sampler
from service.engine.scheduler import DecodeStep, PrefillStep, Scheduler
from service.engine.sequence import Phase, Sequence
from service.engine.stopping import StopMatcher
from service.engine.tokenizer import ChatTokenizer
from service.engine.types import ChatKey, GenerationId, SamplingParams
from service.errors import QueueFull
from tests.engine.fake_runner import byte_tokenizer

MakeSequence = Callable[..., Sequence]


@pytest.fixture(scope="module")
def chat_tokenizer() -> ChatTokenizer:
    return byte_tokenizer()  # no model: the scheduler never looks at tokens


@pytest.fixture
def make_seq(chat_tokenizer: ChatTokenizer) -> MakeSequence:
    counter = iter(range(1_000_000))

    def make(prompt_len: int = 10) -> Sequence:
        n = next(counter)
        params = SamplingParams()
        seq = Sequence(
            id=GenerationId(n),
            chat=ChatKey(f"chat-{n}"),
            prompt=list(range(1, prompt_len + 1)),
            params=params,
            sampler=Sampler(params),
            detokenizer=chat_tokenizer.detokenizer(),
            stop=StopMatcher(()),
            eos_ids=chat_tokenizer.eos_token_ids,
            max_len=4096,
        )
        seq.entry = CacheEntry(key=seq.chat, slot=n % 8)
        return seq

    return make


def scheduler(**overrides: int) -> Scheduler:
    settings = {"max_batch": 4, "max_waiting": 8, "prefill_chunk": 64, "interleaved_chunk": 8, **overrides}
    return Scheduler(**settings)


def test_admission_is_fifo(make_seq: MakeSequence) -> None:
    sched = scheduler()
    seqs = [make_seq() for _ in range(3)]
    for seq in seqs:
        sched.add(seq)
    admitted = [sched.admit_next() for _ in seqs]
    assert admitted == seqs
    assert all(seq.phase is Phase.PREFILL for seq in admitted)
    assert list(sched.prefilling) == seqs
    assert not sched.waiting


def test_queue_positions(make_seq: MakeSequence) -> None:
    sched = scheduler(max_batch=2)
    seqs = [make_seq() for _ in range(5)]
    assert [sched.add(seq) for seq in seqs] == [0, 0, 1, 2, 3]
    assert [sched.queue_position(seq) for seq in seqs] == [1, 2, 3, 4, 5]
    assert sched.has_room()
    first = sched.admit_next()
    second = sched.admit_next()
    assert not sched.has_room()  # max_batch reached
    assert sched.queue_position(first) == 0
    assert [sched.queue_position(seq) for seq in seqs[2:]] == [1, 2, 3]
    sched.start_decoding(first)
    assert not sched.has_room()
    sched.remove(second)
    assert sched.has_room()
    assert sched.admit_next() is seqs[2]
    assert [sched.queue_position(seq) for seq in seqs[3:]] == [1, 2]


def test_queue_full_at_the_bound(make_seq: MakeSequence) -> None:
    sched = scheduler(max_waiting=2)
    sched.add(make_seq())
    sched.add(make_seq())
    with pytest.raises(QueueFull):
        sched.add(make_seq())
    sched.admit_next()
    sched.add(make_seq())  # room again once one left the waiting queue
    assert len(sched.waiting) == 2


def test_prefill_alone_uses_the_full_chunk(make_seq: MakeSequence) -> None:
    sched = scheduler(prefill_chunk=64, interleaved_chunk=8)
    seq = make_seq(prompt_len=150)
    sched.add(seq)
    sched.admit_next()
    ends = []
    while True:
        step = sched.next_step(None)
        assert isinstance(step, PrefillStep)
        assert step.sequence is seq
        assert step.entry is seq.entry
        assert step.start == seq.prefilled
        assert step.end == chunk_end(step.start, 150, 64)
        ends.append(step.end)
        seq.prefilled = step.end
        if step.end == len(seq.prompt):
            break
    assert ends == [64, 128, 150]


def test_prefill_and_decode_alternate_with_small_chunks(make_seq: MakeSequence) -> None:
    sched = scheduler(prefill_chunk=64, interleaved_chunk=8)
    decoders = [make_seq(), make_seq()]
    for seq in decoders:
        sched.add(seq)
        sched.admit_next()
        sched.start_decoding(seq)
    assert all(seq.phase is Phase.DECODE for seq in decoders)
    newcomer = make_seq(prompt_len=40)
    sched.add(newcomer)
    sched.admit_next()

    kinds = []
    while newcomer.prefilled < len(newcomer.prompt):
        step = sched.next_step(None)
        if isinstance(step, PrefillStep):
            kinds.append("P")
            assert step.sequence is newcomer
            assert step.end == chunk_end(step.start, 40, 8)
            assert step.end - step.start <= 9
            newcomer.prefilled = step.end
        else:
            assert isinstance(step, DecodeStep)
            kinds.append("D")
            assert step.sequences == decoders
    assert "".join(kinds) == "PD" * 4 + "P"
    sched.start_decoding(newcomer)
    step = sched.next_step(None)
    assert isinstance(step, DecodeStep)
    assert step.sequences == [*decoders, newcomer]


def test_decode_alone_and_idle(make_seq: MakeSequence) -> None:
    sched = scheduler()
    assert sched.is_idle()
    assert sched.next_step(None) is None
    seq = make_seq()
    sched.add(seq)
    assert not sched.is_idle()
    sched.admit_next()
    sched.start_decoding(seq)
    for _ in range(3):
        step = sched.next_step(None)
        assert isinstance(step, DecodeStep)
        assert step.sequences == [seq]
    sched.remove(seq)
    assert sched.is_idle()


def test_settling_runs_only_when_nothing_else_is_due(make_seq: MakeSequence) -> None:
    sched = scheduler(prefill_chunk=64)
    idle = CacheEntry(key=ChatKey("idle"), slot=7, ids=list(range(20)), exact=12)
    step = sched.next_step(idle)
    assert isinstance(step, PrefillStep)
    assert (step.sequence, step.entry, step.start, step.end) == (None, idle, 12, 20)
    # One decode-mode position left: re-prefill from one earlier so the chunk has two tokens.
    idle.exact = 19
    step = sched.next_step(idle)
    assert isinstance(step, PrefillStep)
    assert (step.start, step.end) == (18, 20)

    seq = make_seq()
    sched.add(seq)
    sched.admit_next()
    sched.start_decoding(seq)
    step = sched.next_step(idle)
    assert isinstance(step, DecodeStep)


def test_swap_remove_keeps_the_order_of_the_rest(make_seq: MakeSequence) -> None:
    sched = scheduler(max_batch=8)
    seqs = [make_seq() for _ in range(5)]
    for seq in seqs:
        sched.add(seq)
        sched.admit_next()
        sched.start_decoding(seq)
    a, b, c, d, e = seqs
    sched.remove(b)  # the last one takes b's place; the others keep theirs
    assert sched.decoding == [a, e, c, d]
    sched.remove(d)  # removing the last one moves nobody
    assert sched.decoding == [a, e, c]
    sched.remove(a)
    assert sched.decoding == [c, e]
    sched.remove(b)  # already gone: no change
    assert sched.decoding == [c, e]


def test_remove_from_waiting_and_prefilling(make_seq: MakeSequence) -> None:
    sched = scheduler(max_batch=1)
    first, second, third = make_seq(), make_seq(), make_seq()
    for seq in (first, second, third):
        sched.add(seq)
    sched.admit_next()
    sched.remove(second)
    assert list(sched.waiting) == [third]
    sched.remove(first)
    assert not sched.prefilling
    assert sched.admit_next() is third


def test_a_fork_follower_waiting_for_its_leader_takes_no_prefill_step(make_seq: MakeSequence) -> None:
    """Admitted before its leader's prompt is done, a follower is skipped; the leader prefills."""
    sched = scheduler()
    leader, follower = make_seq(), make_seq()
    follower.leader, follower.waits_for_leader = leader, True
    for seq in (follower, leader):  # the follower first: it must not block the queue
        sched.add(seq)
        sched.admit_next()
    step = sched.next_step(None)
    assert isinstance(step, PrefillStep)
    assert step.sequence is leader
    sched.start_decoding(leader)
    step = sched.next_step(None)
    assert isinstance(step, DecodeStep)
    assert step.sequences == [leader]


def test_a_fork_is_queued_whole_or_not_at_all(make_seq: MakeSequence) -> None:
    sched = scheduler(max_batch=1, max_waiting=3)
    sched.add(make_seq())
    with pytest.raises(QueueFull):
        sched.add_all([make_seq() for _ in range(3)])
    assert len(sched.waiting) == 1
    assert sched.add_all([make_seq(), make_seq()]) == [1, 2]
