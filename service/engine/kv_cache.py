"""Which chat's KV cache lives in which slot of the runner's pool, and what it holds.

Exactness rule (measured, see the issue notes): a position's keys and values computed in
"prompt mode" (a chunk of two or more tokens) are bit-identical whatever the chunking,
but a position computed in a one-token decode step differs in the last bits, which int8
activation quantization then amplifies. So an entry tracks ``exact``: the prefix computed
in prompt mode. Only that prefix is reused by a later turn; the positions a generation
wrote in decode steps are re-prefilled ("settled") once the generation ends. With that,
a cached chat and a chat recomputed from scratch hold identical caches and continue
identically.

The same holds across chats: another chat's exact prefix, copied position by position into
a new generation's slot, is what that generation would have computed itself. So a new
generation starts from the longest exact prefix among its own chat's cache and the caches
of the same owner (``prefix_index``); never another owner's. Sharing one copy of a prefix
between slots is not possible: a model run binds each slot's ``[kv_heads, max_len,
head_dim]`` region as one contiguous past/present buffer, so the prefix is copied. An
entry's ``ids`` and ``exact`` change only through this manager (``truncate``, ``record_*``),
which keeps the index true.

Pure bookkeeping: no onnxruntime, no threads; the engine's worker owns one instance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from service.engine.prefix_index import PrefixIndex, common_prefix, owner_of
from service.engine.types import ChatKey


@dataclass(slots=True, eq=False)
class CacheEntry:
    key: ChatKey | None  # None: a throwaway entry, forgotten when its generation ends
    slot: int
    ids: list[int] = field(default_factory=list)  # tokens whose K/V the slot holds, in order
    exact: int = 0  # ids[:exact] were computed in prompt mode and may be reused
    pins: int = 0  # generations using this entry right now (or a copy reading it)
    last_used: int = 0
    owner: str = ""  # whose caches may read this one (see ``prefix_index.owner_of``)

    def reusable_prefix(self, prompt: Sequence[int]) -> int:
        """Length of the longest prefix of ``prompt`` this entry can serve exactly."""
        return common_prefix(self.ids, prompt, self.exact)


@dataclass(frozen=True, slots=True)
class Reuse:
    """Where a generation's prompt prefix would come from: ``source`` holds ``length`` exact
    positions of it (``source`` is the chat's own idle entry, or another one to copy from)."""

    source: CacheEntry | None
    length: int


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
        self.index = PrefixIndex()
        self._clock = 0
        self.evictions = 0

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def resident_tokens(self) -> int:
        return sum(len(e.ids) for e in self.by_slot if e is not None)

    def peek(self, key: ChatKey, prompt: Sequence[int], hashes: Sequence[int] = ()) -> int:
        """How many prompt tokens a generation for ``key`` would find cached now."""
        return self.plan(key, prompt, hashes).length

    def plan(self, key: ChatKey, prompt: Sequence[int], hashes: Sequence[int] = ()) -> Reuse:
        """The longest exact prefix of ``prompt`` a generation for ``key`` could start from: its
        chat's idle entry, or (when longer) any resident entry of the same owner, busy or not.
        ``hashes`` is ``prefix_index.prompt_hashes(prompt)``; without it only the chat's own
        entry is considered."""
        own = self.by_key.get(key)
        idle_own = own if own is not None and not own.pins else None
        own_length = idle_own.reusable_prefix(prompt) if idle_own is not None else 0
        other, length = self.index.longest(owner_of(key), prompt, hashes, exclude=idle_own)
        if other is not None and length > own_length:
            return Reuse(other, length)
        return Reuse(idle_own if own_length else None, own_length)

    def acquire(self, key: ChatKey) -> tuple[CacheEntry, list[int]]:
        """Pin the chat's entry (or a new one) for a generation.

        Returns the entry and the slots whose memory the caller must release (evicted
        entries). A chat already pinned by another generation gets a throwaway entry.
        """
        released: list[int] = []
        entry = self.by_key.get(key)
        if entry is None or entry.pins:
            slot = self._free_slot(released)
            entry = CacheEntry(key=key if entry is None else None, slot=slot, owner=owner_of(key))
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
        self.index.remove(entry)
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
            self.index.remove(entry)
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

    def acquire_for(
        self, key: ChatKey, prompt: Sequence[int], hashes: Sequence[int]
    ) -> tuple[CacheEntry, Reuse, list[int]]:
        """``acquire`` for a generation of ``prompt``, planning its reuse first; the entry to copy
        from (if any) is kept from eviction while a slot is found, unless no slot is free
        otherwise. Returns the pinned entry, the reuse still possible, released slots."""
        plan = self.plan(key, prompt, hashes)
        source = plan.source
        if source is None or (source is self.by_key.get(key) and not source.pins):
            entry, released = self.acquire(key)
            return entry, plan, released
        source.pins += 1
        try:
            entry, released = self.acquire(key)
        except NoFreeSlot:
            source.pins -= 1
            entry, released = self.acquire(key)  # the source may be evicted for it
            if not self.resident(source):
                plan = Reuse(None, 0)
            return entry, plan, released
        source.pins -= 1
        return entry, plan, released

    def resident(self, entry: CacheEntry) -> bool:
        return self.by_slot[entry.slot] is entry

    def truncate(self, entry: CacheEntry, length: int) -> None:
        """Keep only the first ``length`` positions of ``entry``."""
        del entry.ids[length:]
        entry.exact = min(entry.exact, length)
        self.index.sync(entry)

    def record_prefill(self, entry: CacheEntry, start: int, ids: Sequence[int]) -> None:
        """The slot now holds ``ids`` at positions ``start..``, computed in prompt mode."""
        if start < entry.exact:
            self.truncate(entry, start)
        del entry.ids[start:]
        entry.ids.extend(ids)
        entry.exact = len(entry.ids)
        self.index.sync(entry)

    def record_settled(self, entry: CacheEntry, end: int) -> None:
        """Positions up to ``end`` of an idle entry were re-prefilled: exact now."""
        entry.exact = max(entry.exact, end)
        self.index.sync(entry)

    def record_copy(self, entry: CacheEntry, source: CacheEntry, length: int) -> None:
        """The runner copied ``source``'s first ``length`` (exact) positions into ``entry``'s slot."""
        assert length <= source.exact, "only exact positions may be copied"
        self.index.remove(entry)
        entry.ids[:] = source.ids[:length]
        entry.exact = length
        self.index.sync(entry)
        source.last_used = self._tick()

    def record_clone(self, entry: CacheEntry, source: CacheEntry) -> None:
        """The runner copied all of ``source``'s positions, decode-mode ones included, into
        ``entry``'s slot (a beam search's split): ``entry`` holds what ``source`` holds."""
        self.index.remove(entry)
        entry.ids[:] = source.ids
        entry.exact = source.exact
        self.index.sync(entry)

    def available(self) -> int:
        """Slots a generation could take now: empty ones and those of idle entries."""
        return sum(1 for e in self.by_slot if e is None or e.pins == 0)

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
