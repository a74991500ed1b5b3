"""The KV cache bookkeeping: chunking rule, pins, LRU eviction, throwaway entries, swaps."""

from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.engine.kv_cache import CacheEntry, KVCacheManager, NoFreeSlot, chunk_end
from service.engine.types import ChatKey

A, B, C, D = (ChatKey(name) for name in ("a", "b", "c", "d"))


def chunks(total: int, chunk: int) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    start = 0
    while start < total:
        end = chunk_end(start, total, chunk)
        spans.append((start, end))
        start = end
    return spans


@given(total=st.integers(1, 3000), chunk=st.integers(1, 700))
def test_chunks_cover_the_range_exactly(total: int, chunk: int) -> None:
    spans = chunks(total, chunk)
    assert spans[0][0] == 0
    assert spans[-1][1] == total
    for (_, end), (next_start, _) in pairwise(spans):
        assert end == next_start
    for start, end in spans:
        assert start < end
        if start > 0:
            assert end - start >= 2, spans
        assert total - end != 1, spans


@given(data=st.data(), total=st.integers(1, 3000), chunk=st.integers(1, 700))
def test_chunk_end_from_any_valid_start(data: st.DataObject, total: int, chunk: int) -> None:
    start = data.draw(st.sampled_from([0, *range(1, total - 1)]) if total > 2 else st.just(0))
    end = chunk_end(start, total, chunk)
    assert start < end <= total
    if start > 0:
        assert end - start >= 2
    assert total - end != 1
    # Never more than one token past the requested chunk (two is the floor).
    assert end - start <= max(chunk, 2) + 1


@given(total=st.integers(2, 100), chunk=st.integers(1, 50))
def test_one_token_after_position_zero_is_refused(total: int, chunk: int) -> None:
    with pytest.raises(ValueError, match="at least two"):
        chunk_end(total - 1, total, chunk)


def test_a_single_token_prompt_is_one_chunk_from_zero() -> None:
    assert chunk_end(0, 1, 512) == 1


def fill(entry: CacheEntry, n: int, exact: int | None = None) -> None:
    entry.ids = list(range(100, 100 + n))
    entry.exact = n if exact is None else exact


def assert_consistent(manager: KVCacheManager) -> None:
    for slot, entry in enumerate(manager.by_slot):
        if entry is not None:
            assert entry.slot == slot
    for key, entry in manager.by_key.items():
        assert entry.key == key
        assert manager.by_slot[entry.slot] is entry


def test_acquire_and_release_pin_and_keep_the_entry() -> None:
    manager = KVCacheManager(slots=2, budget_tokens=100)
    entry, released = manager.acquire(A)
    assert released == []
    assert (entry.key, entry.slot, entry.pins) == (A, 0, 1)
    assert manager.by_key[A] is entry
    fill(entry, 5)
    assert manager.release(entry) == []
    assert entry.pins == 0
    again, released = manager.acquire(A)
    assert again is entry
    assert released == []
    assert again.pins == 1
    assert_consistent(manager)


def test_a_pinned_chat_gets_a_throwaway_entry_dropped_on_release() -> None:
    manager = KVCacheManager(slots=3, budget_tokens=100)
    first, _ = manager.acquire(A)
    fill(first, 4)
    second, released = manager.acquire(A)
    assert released == []
    assert second is not first
    assert second.key is None
    assert second.slot != first.slot
    assert manager.by_key[A] is first
    fill(second, 6)
    assert manager.release(second) == [second.slot]
    assert manager.by_slot[second.slot] is None
    assert manager.by_key[A] is first
    assert manager.evictions == 0
    assert_consistent(manager)


def test_lru_eviction_under_the_token_budget() -> None:
    manager = KVCacheManager(slots=4, budget_tokens=10)
    entries = {}
    releases = []
    for key in (A, B, C):
        entry, _ = manager.acquire(key)
        fill(entry, 4)
        entries[key] = entry
        releases.append(manager.release(entry))
    # 12 resident > 10 after C: the least recently used idle entry (A) went.
    assert releases == [[], [], [entries[A].slot]]
    assert A not in manager.by_key
    assert manager.evictions == 1
    # Touching B makes C the least recently used.
    b, _ = manager.acquire(B)
    manager.release(b)
    d, _ = manager.acquire(D)
    fill(d, 4)
    assert manager.release(d) == [entries[C].slot]
    assert set(manager.by_key) == {B, D}
    assert manager.resident_tokens() == 8
    assert_consistent(manager)


def test_pinned_entries_are_never_evicted_for_the_budget() -> None:
    manager = KVCacheManager(slots=3, budget_tokens=0)
    a, _ = manager.acquire(A)
    b, _ = manager.acquire(B)
    fill(a, 5)
    fill(b, 5)
    # b stays pinned; a, now idle, is the only candidate.
    assert manager.release(a) == [a.slot]
    assert manager.by_key == {B: b}
    assert manager.resident_tokens() == 5


def test_a_full_pool_evicts_the_lru_idle_entry() -> None:
    manager = KVCacheManager(slots=2, budget_tokens=1000)
    a, _ = manager.acquire(A)
    b, _ = manager.acquire(B)
    manager.release(b)
    manager.release(a)  # a is now the most recently used
    c, released = manager.acquire(C)
    assert released == [b.slot]
    assert c.slot == b.slot
    assert set(manager.by_key) == {A, C}
    assert_consistent(manager)


def test_no_free_slot_when_every_entry_is_pinned() -> None:
    manager = KVCacheManager(slots=2, budget_tokens=1000)
    manager.acquire(A)
    manager.acquire(B)
    with pytest.raises(NoFreeSlot):
        manager.acquire(C)
    with pytest.raises(NoFreeSlot):
        manager.acquire(A)  # would need a throwaway entry
    assert set(manager.by_key) == {A, B}


def test_reusable_prefix_respects_exact() -> None:
    entry = CacheEntry(key=A, slot=0, ids=[1, 2, 3, 4, 5], exact=3)
    assert entry.reusable_prefix([1, 2, 3, 4, 5, 6]) == 3
    assert entry.reusable_prefix([1, 2]) == 2
    assert entry.reusable_prefix([1, 9, 3]) == 1
    assert entry.reusable_prefix([7]) == 0
    assert entry.reusable_prefix([]) == 0
    entry.exact = 5
    assert entry.reusable_prefix([1, 2, 3, 4, 5, 6]) == 5


def test_peek_sees_only_idle_entries() -> None:
    manager = KVCacheManager(slots=2, budget_tokens=100)
    assert manager.peek(A, [1, 2, 3]) == 0
    entry, _ = manager.acquire(A)
    entry.ids, entry.exact = [1, 2, 3], 2
    assert manager.peek(A, [1, 2, 3]) == 0  # pinned
    manager.release(entry)
    assert manager.peek(A, [1, 2, 3]) == 2


def test_swap_keeps_slots_consistent() -> None:
    manager = KVCacheManager(slots=3, budget_tokens=100)
    a, _ = manager.acquire(A)
    b, _ = manager.acquire(B)
    c, _ = manager.acquire(C)
    manager.release(b)
    manager.forget(B)
    assert manager.by_slot == [a, None, c]
    manager.swap(0, 2)
    assert manager.by_slot == [c, None, a]
    assert (a.slot, c.slot) == (2, 0)
    manager.swap(2, 1)  # with an empty slot
    assert manager.by_slot == [c, a, None]
    assert a.slot == 1
    manager.swap(1, 1)
    assert manager.by_slot == [c, a, None]
    assert_consistent(manager)


def test_forget_and_unsettled() -> None:
    manager = KVCacheManager(slots=3, budget_tokens=100)
    a, _ = manager.acquire(A)
    b, _ = manager.acquire(B)
    fill(a, 6, exact=4)
    fill(b, 6, exact=6)
    assert manager.unsettled() == []  # both pinned
    assert manager.forget(A) is None  # pinned: kept
    manager.release(a)
    manager.release(b)
    assert manager.unsettled() == [a]
    assert manager.forget(A) == a.slot
    assert manager.by_slot[a.slot] is None
    assert manager.forget(A) is None
    assert_consistent(manager)
