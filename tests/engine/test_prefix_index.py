"""The prefix index: longest exact prefix per owner, never across owners, bounded work per lookup."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.engine import prefix_index
from service.engine.kv_cache import CacheEntry
from service.engine.prefix_index import BLOCK, CANDIDATES, PrefixIndex, common_prefix, owner_of, prompt_hashes
from service.engine.types import ChatKey

tokens = st.lists(st.integers(0, 3), min_size=0, max_size=5 * BLOCK)  # a small alphabet: long shared prefixes


def entry(owner: str, ids: list[int], exact: int, slot: int = 0) -> CacheEntry:
    return CacheEntry(key=ChatKey(f"{owner}/{slot}"), slot=slot, ids=list(ids), exact=exact, owner=owner)


def naive_prefix(a: list[int], b: list[int], limit: int) -> int:
    n = 0
    while n < min(limit, len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@given(a=tokens, b=tokens, limit=st.integers(0, 6 * BLOCK))
def test_common_prefix_matches_a_token_by_token_scan(a: list[int], b: list[int], limit: int) -> None:
    assert common_prefix(a, b, limit) == naive_prefix(a, b, limit)


@given(
    caches=st.lists(
        st.tuples(st.sampled_from(["alice", "bob"]), tokens, st.floats(0, 1)), max_size=CANDIDATES
    ),
    prompt=tokens,
)
def test_lookup_finds_the_longest_exact_prefix_of_the_same_owner(
    caches: list[tuple[str, list[int], float]], prompt: list[int]
) -> None:
    """With at most CANDIDATES caches, the lookup returns the best one of alice's, never bob's,
    counting only exact positions."""
    index = PrefixIndex()
    entries = [
        entry(owner, ids, int(len(ids) * share), slot) for slot, (owner, ids, share) in enumerate(caches)
    ]
    for e in entries:
        index.sync(e)
    found, length = index.longest("alice", prompt, prompt_hashes(prompt))
    best = max(
        (naive_prefix(e.ids, prompt, e.exact) for e in entries if e.owner == "alice"),
        default=0,
    )
    if best < BLOCK:  # shorter than a block: not worth indexing
        assert length <= best
    else:
        assert length == best
    if found is not None:
        assert found.owner == "alice"
        assert naive_prefix(found.ids, prompt, found.exact) == length


@given(ids=tokens, first=st.integers(0, 5 * BLOCK), second=st.integers(0, 5 * BLOCK), tail=tokens)
def test_shrinking_and_regrowing_an_entry_keeps_the_index_true(
    ids: list[int], first: int, second: int, tail: list[int]
) -> None:
    """After a truncation then new tokens, the index describes the entry's current ids only."""
    index = PrefixIndex()
    e = entry("alice", ids, len(ids))
    index.sync(e)
    cut = min(first, len(ids))
    del e.ids[cut:]
    e.exact = cut
    index.sync(e)
    e.ids.extend(tail)
    e.exact = min(len(e.ids), cut + second)
    index.sync(e)
    probe = ids + [9] * BLOCK  # the old content: found only as far as it survives
    _, length = index.longest("alice", probe, prompt_hashes(probe))
    assert length <= naive_prefix(e.ids, probe, e.exact)
    assert length >= naive_prefix(e.ids, probe, e.exact) // BLOCK * BLOCK
    index.remove(e)
    assert index.longest("alice", probe, prompt_hashes(probe)) == (None, 0)
    assert len(index) == 0


def test_owner_is_the_text_before_the_first_slash() -> None:
    assert owner_of(ChatKey("u1/api-9f")) == "u1"
    assert owner_of(ChatKey("u1/a/b")) == "u1"
    assert owner_of(ChatKey("solo")) == "solo"


def test_a_lookup_among_hundreds_of_caches_checks_a_bounded_few(monkeypatch: pytest.MonkeyPatch) -> None:
    """500 caches of one owner share a system prompt: a lookup compares tokens of at most
    CANDIDATES of them, and still finds the one that shares the whole prompt."""
    system = list(range(100, 100 + 20 * BLOCK))
    index = PrefixIndex()
    entries = [entry("alice", [*system, 1000 + i, 7, 7], len(system) + 3, slot=i) for i in range(500)]
    for e in entries:
        index.sync(e)
    target = entries[123]
    target.ids += list(range(3000, 3000 + 4 * BLOCK))
    target.exact = len(target.ids)
    index.sync(target)
    checked: list[int] = []
    real = prefix_index.common_prefix

    def counting(a: list[int], b: list[int], limit: int) -> int:
        checked.append(limit)
        return real(a, b, limit)

    monkeypatch.setattr(prefix_index, "common_prefix", counting)
    prompt = [*target.ids, 5, 5]
    found, length = index.longest("alice", prompt, prompt_hashes(prompt))
    assert found is target
    assert length == len(target.ids)
    assert len(checked) <= CANDIDATES
    other, shared = index.longest("alice", [*system, 4242], prompt_hashes([*system, 4242]))
    assert other is not None
    assert shared == len(system)
    assert index.longest("bob", prompt, prompt_hashes(prompt)) == (None, 0)
