"""Which chat's KV cache lives in which slot of the runner's pool, and what it holds.

Exactness rule (measured, see the issue notes): a position's keys and values computed in
"prompt mode" (a chunk of two or more tokens) are bit-identical whatever the chunking,
but a position computed in a one-token decode step differs in the last bits, which int8
activation quantization then amplifies. So an entry tracks ``exact``: the prefix computed
in prompt mode. Only that prefix is reused by a later turn; the positions a generation
wrote in decode steps are re-prefilled ("settled") once the generation ends. With that,
a cached chat and a chat recomputed from scratch hold identical caches and continue
identically.

Pure bookkeeping: no onnxruntime, no threads; the engine's worker owns one instance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from service.engine.types import ChatKey


@dataclass(slots=True, eq=False)
class CacheEntry:
    key: ChatKey | None  # None: a throwaway entry, forgotten when its generation ends
    slot: int
    ids: list[int] = field(default_factory=list)  # tokens whose K/V the slot holds, in order
    exact: int = 0  # ids[:exact] were computed in prompt mode and may be reused
    pins: int = 0  # generations using this entry right now
    last_used: int = 0

    def reusable_prefix(self, prompt: Sequence[int]) -> int:
        """Length of the longest prefix of ``prompt`` this entry can serve exactly."""
        limit = min(self.exact, len(prompt))
        n = 0
        while n < limit and self.ids[n] == prompt[n]:
            n += 1
        return n


def chunk_end(start: int, total: int, chunk: int) -> int:
    """End of the next prefill chunk over positions [start, total).

    No chunk after position 0 is a single token (it would run in decode mode and be
    inexact), and none leaves a single token behind for the next one.
    """
    if total - start < 2 and start > 0:
        raise ValueError("a prefill after position 0 needs at least two tokens")
    end = min(total, start + max(chunk, 2))
    if total - end == 1:
        end = end - 1 if end - start > 2 else total
    return end


class NoFreeSlot(Exception):
    """Every slot is held by a generation in flight."""


class KVCacheManager:
    """Slots, their entries, LRU eviction under a token budget."""

    def __init__(self, slots: int, budget_tokens: int) -> None:
        self.slots = slots
        self.budget_tokens = budget_tokens
        self.by_slot: list[CacheEntry | None] = [None] * slots
        self.by_key: dict[ChatKey, CacheEntry] = {}
        self._clock = 0
        self.evictions = 0

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def resident_tokens(self) -> int:
        return sum(len(e.ids) for e in self.by_slot if e is not None)

    def peek(self, key: ChatKey, prompt: Sequence[int]) -> int:
        """How many prompt tokens a generation for ``key`` would find cached now."""
        entry = self.by_key.get(key)
        if entry is None or entry.pins:
            return 0
        return entry.reusable_prefix(prompt)

    def acquire(self, key: ChatKey) -> tuple[CacheEntry, list[int]]:
        """Pin the chat's entry (or a new one) for a generation.

        Returns the entry and the slots whose memory the caller must release (evicted
        entries). A chat already pinned by another generation gets a throwaway entry.
        """
        released: list[int] = []
        entry = self.by_key.get(key)
        if entry is None or entry.pins:
            slot = self._free_slot(released)
            entry = CacheEntry(key=key if entry is None else None, slot=slot)
            self.by_slot[slot] = entry
            if entry.key is not None:
                self.by_key[entry.key] = entry
        entry.pins += 1
        entry.last_used = self._tick()
        return entry, released

    def _free_slot(self, released: list[int]) -> int:
        for slot, entry in enumerate(self.by_slot):
            if entry is None:
                return slot
        victim = self._lru_idle()
        if victim is None:
            raise NoFreeSlot
        released.append(victim.slot)
        self._drop(victim)
        return victim.slot

    def _lru_idle(self) -> CacheEntry | None:
        idle = [e for e in self.by_slot if e is not None and e.pins == 0]
        return min(idle, key=lambda e: e.last_used) if idle else None

    def _drop(self, entry: CacheEntry) -> None:
        self.by_slot[entry.slot] = None
        if entry.key is not None and self.by_key.get(entry.key) is entry:
            del self.by_key[entry.key]
        self.evictions += 1

    def release(self, entry: CacheEntry) -> list[int]:
        """Unpin after a generation; returns slots evicted to honour the budget."""
        entry.pins -= 1
        entry.last_used = self._tick()
        released: list[int] = []
        if entry.pins == 0 and entry.key is None:
            self.by_slot[entry.slot] = None
            released.append(entry.slot)
        while self.resident_tokens() > self.budget_tokens:
            victim = self._lru_idle()
            if victim is None:
                break
            released.append(victim.slot)
            self._drop(victim)
        return released

    def forget(self, key: ChatKey) -> int | None:
        """Drop a chat's idle entry (e.g. the chat was deleted); returns its slot."""
        entry = self.by_key.get(key)
        if entry is None or entry.pins:
            return None
        self._drop(entry)
        return entry.slot

    def swap(self, a: int, b: int) -> None:
        """Record that the runner exchanged the contents of slots ``a`` and ``b``."""
        ea, eb = self.by_slot[a], self.by_slot[b]
        self.by_slot[a], self.by_slot[b] = eb, ea
        if ea is not None:
            ea.slot = b
        if eb is not None:
            eb.slot = a

    def unsettled(self) -> list[CacheEntry]:
        """Idle entries holding decode-mode positions that a re-prefill would make exact."""
        return [
            e
            for e in self.by_slot
            if e is not None and e.pins == 0 and e.key is not None and e.exact < len(e.ids)
        ]
