"""Scheduling policy: which work the next model run does. Pure: no model, no threads.

Each step is either one prefill chunk of one sequence (a chunk with past must run at
batch 1) or one batched decode step of every decoding sequence. When both kinds of work
are pending they alternate, and prefill chunks are kept small while others decode, so a
long prompt delays the running generations by at most one small chunk per token.
Admission is FIFO from a bounded waiting queue. A fork's follower waiting for its leader's
prefill (``Sequence.waits_for_leader``) takes no prefill step of its own. The beams of a beam
search that are not decoding right now are ``parked``: they hold their slot (and their place in
the batch) for the search's next split, and run nothing.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from service.engine.kv_cache import CacheEntry, chunk_end
from service.engine.sequence import Phase, Sequence
from service.errors import QueueFull


@dataclass(frozen=True, slots=True)
class PrefillStep:
    sequence: Sequence | None  # None: settling an idle chat's cache
    entry: CacheEntry
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class DecodeStep:
    sequences: list[Sequence]


Step = PrefillStep | DecodeStep


class Scheduler:
    def __init__(
        self, *, max_batch: int, max_waiting: int, prefill_chunk: int, interleaved_chunk: int
    ) -> None:
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.prefill_chunk = prefill_chunk
        self.interleaved_chunk = interleaved_chunk
        self.waiting: deque[Sequence] = deque()
        self.prefilling: deque[Sequence] = deque()
        self.decoding: list[Sequence] = []
        self.parked: list[Sequence] = []
        self._last_was_prefill = False

    def add(self, seq: Sequence) -> int:
        """Queue a sequence; returns its queue position (0 = it can start at once)."""
        if len(self.waiting) >= self.max_waiting:
            raise QueueFull(f"{len(self.waiting)} generations already waiting")
        self.waiting.append(seq)
        return max(0, self.running + len(self.waiting) - self.max_batch)

    def add_all(self, seqs: list[Sequence]) -> list[int]:
        """Queue several sequences, all or none (``QueueFull``)."""
        if len(self.waiting) + len(seqs) > self.max_waiting:
            raise QueueFull(f"{len(self.waiting)} generations already waiting")
        return [self.add(seq) for seq in seqs]

    def queue_position(self, seq: Sequence) -> int:
        try:
            return self.waiting.index(seq) + 1
        except ValueError:
            return 0

    @property
    def running(self) -> int:
        """Sequences holding a place in the batch."""
        return len(self.prefilling) + len(self.decoding) + len(self.parked)

    def has_room(self, places: int = 1) -> bool:
        return bool(self.waiting) and self.running + places <= self.max_batch

    def admit_next(self) -> Sequence:
        seq = self.waiting.popleft()
        seq.phase = Phase.PREFILL
        self.prefilling.append(seq)
        return seq

    def start_decoding(self, seq: Sequence) -> None:
        self.prefilling.remove(seq)
        seq.phase = Phase.DECODE
        self.decoding.append(seq)

    def activate(self, seq: Sequence) -> None:
        """A prefilled or parked beam decodes from the next step on."""
        if seq in self.decoding:
            return
        for container in (self.prefilling, self.parked):
            if seq in container:
                container.remove(seq)
        seq.phase = Phase.DECODE
        self.decoding.append(seq)

    def park(self, seq: Sequence) -> None:
        """A beam keeps its slot and its place in the batch but runs nothing."""
        if seq in self.parked:
            return
        self.remove(seq)
        seq.phase = Phase.DECODE
        self.parked.append(seq)

    def remove(self, seq: Sequence) -> None:
        for container in (self.waiting, self.prefilling, self.parked):
            if seq in container:
                container.remove(seq)
        if seq in self.decoding:
            # Swap-remove: only the last decoder changes place (one slot swap, not a shift).
            index = self.decoding.index(seq)
            last = self.decoding.pop()
            if last is not seq:
                self.decoding[index] = last

    def is_idle(self) -> bool:
        return not (self.waiting or self.prefilling or self.decoding or self.parked)

    def next_step(self, settle: CacheEntry | None) -> Step | None:
        """The next model run, or None when there is nothing to do.

        ``settle`` is an idle chat whose decode-mode positions may be re-prefilled; it
        runs only when no generation needs the model.
        """
        ready = next((s for s in self.prefilling if not s.waits_for_leader), None)
        prefill_due = ready is not None and (not self.decoding or not self._last_was_prefill)
        self._last_was_prefill = prefill_due
        if prefill_due:
            seq = ready
            assert seq is not None
            assert seq.entry is not None
            chunk = self.interleaved_chunk if self.decoding else self.prefill_chunk
            return PrefillStep(
                seq, seq.entry, seq.prefilled, chunk_end(seq.prefilled, len(seq.prompt), chunk)
            )
        if self.decoding:
            return DecodeStep(list(self.decoding))
        if settle is not None:
            start = settle.exact if len(settle.ids) - settle.exact > 1 else max(0, settle.exact - 1)
            return PrefillStep(None, settle, start, chunk_end(start, len(settle.ids), self.prefill_chunk))
        return None
