"""The engine: one worker thread runs the model; the event loop only hands work in and
drains results out.

``Engine.submit`` (and ``submit_fork``, ``submit_beam``) returns a ``GenerationStream`` at
once: an async iterator of ``Delta`` followed by a final ``GenerationResult``. The worker
thread owns the runner, the scheduler and the KV cache bookkeeping; one lock guards that bookkeeping
(never held during a model run), so ``submit``, ``cancel`` and the statistics are safe to call from
the event loop without blocking it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import numpy as np

from service.config import EngineSettings
from service.engine.beam import ScorerName
from service.engine.beam_group import BeamGroup
from service.engine.kv_cache import CacheEntry, KVCacheManager, NoFreeSlot, Reuse
from service.engine.model_runner import ModelRunner
from service.engine.prefix_index import owner_of, prompt_hashes
from service.engine.sampling import ForcedSampler, Sampler
from service.engine.scheduler import DecodeStep, PrefillStep, Scheduler
from service.engine.sequence import Phase, Sequence
from service.engine.stopping import StopMatcher
from service.engine.tokenizer import ChatTokenizer
from service.engine.types import ChatKey, Delta, FinishReason, GenerationId, GenerationResult, SamplingParams
from service.errors import ContextOverflow, InvalidParams, QueueFull

log = logging.getLogger(__name__)

_Event = Delta | GenerationResult


@dataclass(slots=True)
class EngineStats:
    """Monotonic counters and current gauges, read by /metrics and the benchmarks."""

    steps: int = 0
    decode_steps: int = 0
    generated_tokens: int = 0
    prefill_tokens: int = 0  # prompt positions computed
    cached_tokens: int = 0  # prompt positions served from a cache (the chat's own or another's)
    shared_tokens: int = 0  # of those, positions copied from another cache of the same owner
    forked_tokens: int = 0  # prompt positions copied from a fork's leader (``submit_fork``)
    settled_tokens: int = 0  # decode-mode positions re-prefilled to make a cache exact
    waiting: int = 0
    running: int = 0
    resident_tokens: int = 0
    unsettled_chats: int = 0  # finished chats whose caches still wait to be made exact
    evictions: int = 0
    decode_rows: int = 0  # sequences run by decode steps, summed over the steps
    beam_rows: int = 0  # of those, the rows of beam searches
    max_decode_batch: int = 0  # the most rows one decode step ran
    slot_moves: int = 0  # cache swaps that brought the decoders back into one range of slots


class GenerationStream:
    """What ``submit`` returns: the deltas of one generation, then its result."""

    def __init__(self, engine: Engine, seq: Sequence, queue_position: int, cached_estimate: int) -> None:
        self._engine = engine
        self._seq = seq
        self._queue: asyncio.Queue[_Event] = asyncio.Queue()
        self._result: GenerationResult | None = None
        self._listener: Callable[[_Event], None] | None = None
        self.id = seq.id
        self.prompt_tokens = len(seq.prompt)
        self.queue_position = queue_position
        self.cached_tokens = cached_estimate
        self.rows = 1  # places in the batch it holds (a beam search: its width)

    def __aiter__(self) -> AsyncIterator[Delta]:
        return self

    async def __anext__(self) -> Delta:
        if self._result is not None:
            raise StopAsyncIteration
        event = await self._queue.get()
        if isinstance(event, GenerationResult):
            self._result = event
            raise StopAsyncIteration
        return event

    async def result(self) -> GenerationResult:
        """Wait for the end (discarding deltas not yet read) and return the record."""
        while self._result is None:
            event = await self._queue.get()
            if isinstance(event, GenerationResult):
                self._result = event
        return self._result

    @property
    def generated_tokens(self) -> int:
        """Tokens the worker has produced so far (read from any thread)."""
        return len(self._seq.generated)

    def cancel(self) -> None:
        self._engine.cancel(self.id)

    def listen(self, callback: Callable[[Delta | GenerationResult], None]) -> None:
        """Hand every event to ``callback`` on the event loop as it arrives, instead of queueing
        it for iteration: one task switch less per token for a server that forwards them."""
        while not self._queue.empty():
            callback(self._queue.get_nowait())
        self._listener = callback

    def _put(self, event: _Event) -> None:
        if self._listener is not None:
            self._listener(event)
        else:
            self._queue.put_nowait(event)


class Engine:
    def __init__(self, runner: ModelRunner, tokenizer: ChatTokenizer, settings: EngineSettings) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.settings = settings
        self.max_len = runner.max_len
        self.stats = EngineStats()
        self._kv = KVCacheManager(
            runner.slots, settings.kv_budget_mb * 2**20 // runner.shape.kv_bytes_per_token
        )
        self._scheduler = Scheduler(
            max_batch=min(settings.max_batch, runner.slots),
            max_waiting=settings.max_waiting,
            prefill_chunk=settings.prefill_chunk,
            interleaved_chunk=settings.interleaved_chunk,
        )
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._placement_due = False
        self._ids = itertools.count(1)
        self._streams: dict[GenerationId, GenerationStream] = {}
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: asyncio.Event | None = None

    # ---- event-loop side -------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._idle = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name="engine-worker", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        """Cancel whatever runs, wait for the worker to finish its step, and stop it."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    async def wait_idle(self) -> None:
        """Return once the worker has nothing left to do: no generation queued or running,
        and every finished chat's cache settled (exact for reuse)."""
        assert self._idle is not None, "engine not started"
        await self._idle.wait()

    def submit(
        self,
        chat: ChatKey,
        prompt: list[int],
        params: SamplingParams,
        *,
        turn_stops: tuple[str, ...] = (),
    ) -> GenerationStream:
        """Queue a generation continuing ``prompt`` for ``chat``; raises ``QueueFull``,
        ``ContextOverflow`` or ``ValueError`` (bad params) before anything starts.

        ``turn_stops`` end the generation like ``params.stop`` does; a chat turn passes the
        tokenizer's ``turn_stops`` (a base model's transcript marks a turn's end with text).
        """
        return self._submit([chat], [prompt], [params], turn_stops, fork=False)[0]

    def submit_fork(
        self,
        chats: list[ChatKey],
        prompt: list[int],
        params: list[SamplingParams],
        *,
        turn_stops: tuple[str, ...] = (),
    ) -> list[GenerationStream]:
        """Queue one generation per ``(chats[i], params[i])``, all continuing the same ``prompt``,
        which is prefilled once: the first generation computes it (reusing a cache as ``submit``
        does), the others copy its positions into their own slots and sample their first token
        from the same logits. Every stream reports the first one's ``cached_tokens``. For
        OpenAI's ``n``. The keys must share one owner (see ``prefix_index.owner_of``). All or
        none are queued: raises like ``submit``, or ``ValueError`` for mismatched arguments."""
        if not chats or len(chats) != len(params):
            raise ValueError("submit_fork takes one or more keys and one params per key")
        if len({owner_of(chat) for chat in chats}) != 1:
            raise ValueError("the generations of a fork must share one owner")
        return self._submit(list(chats), [prompt], list(params), turn_stops, fork=True)

    def submit_batch(
        self,
        chats: list[ChatKey],
        prompts: list[list[int]],
        params: list[SamplingParams],
        *,
        turn_stops: tuple[str, ...] = (),
    ) -> list[GenerationStream]:
        """Queue one generation per ``(chats[i], prompts[i], params[i])`` in one go: they join
        the queue together, so they are admitted one after another and decode in the same
        batched steps (as far as ``max_batch`` and the slots allow). Each prompt is prefilled on
        its own (reusing a cache as ``submit`` does). All or none are queued: raises like
        ``submit``, or ``ValueError`` for mismatched arguments."""
        if not chats or not len(chats) == len(prompts) == len(params):
            raise ValueError("submit_batch takes one or more keys, with one prompt and params per key")
        return self._submit(list(chats), list(prompts), list(params), turn_stops, fork=False)

    def submit_beam(
        self,
        chat: ChatKey,
        prompt: list[int],
        params: SamplingParams,
        width: int,
        *,
        scorer: ScorerName = "logprob",
        turn_stops: tuple[str, ...] = (),
    ) -> GenerationStream:
        """Queue a beam search of ``width`` beams continuing ``prompt`` (see ``beam.py`` for the
        search, ``beam_group.py`` for how it runs here). Of ``params`` only ``max_tokens`` and
        ``stop`` count: beams follow the model's own log-probabilities, so temperature, top-p,
        top-k, penalties and seed are ignored. The prompt is prefilled once; then each live beam
        is one row of the shared decode steps. The stream's deltas carry the tokens every beam
        that can still win agrees on, as soon as that is known; its result is a ``BeamResult``
        (the winner's remaining text, the candidates and their scores). Cancelling it ends the
        whole search within one step. The group is admitted when ``width`` places in the batch
        are free at once: raises like ``submit``, or ``InvalidParams`` for a width past the
        batch (``max_batch`` and the KV slots)."""
        limit = min(self._scheduler.max_batch, self.runner.slots)
        if not 1 <= width <= limit:
            raise InvalidParams(f"beam_width must be between 1 and {limit}")
        self._check_prompt(prompt, [params])
        stops = (*params.stop, *turn_stops)
        hashes = prompt_hashes(prompt)
        members = [self._sequence(chat, prompt, params, stops, hashes, None) for _ in range(width)]
        max_tokens = min(params.max_tokens, self.max_len - len(prompt))
        group = BeamGroup.create(
            members, self.tokenizer, stops, width=width, max_tokens=max_tokens, scorer=scorer
        )
        for seq in members:
            seq.beam = group
        stream = self._queue(members, shared=True)[0]
        stream.rows = width
        return stream

    def submit_scoring(
        self, chats: list[ChatKey], prompt: list[int], continuations: list[list[int]]
    ) -> list[GenerationStream]:
        """Score each of ``continuations`` after ``prompt`` (teacher forcing): a fork whose
        generations take the given tokens instead of sampling; each result's ``extra`` holds
        ``logprob`` (their summed log-probability) and ``scored_tokens`` (fewer than given when
        the context ends first). The prompt is prefilled once; the continuations decode together.
        For a reranker. Every continuation must be non-empty."""
        if not chats or len(chats) != len(continuations) or not all(continuations):
            raise ValueError("submit_scoring takes one key per non-empty continuation")
        self._check_prompt(prompt, [])
        hashes = prompt_hashes(prompt)
        seqs: list[Sequence] = []
        for chat, tokens in zip(chats, continuations, strict=True):
            params = SamplingParams(max_tokens=len(tokens), temperature=0.0)
            seq = self._sequence(chat, prompt, params, (), hashes, seqs[0] if seqs else None)
            seq.sampler = ForcedSampler(params, tokens)
            seqs.append(seq)
        return self._queue(seqs, shared=True)

    def _check_prompt(self, prompt: list[int], params: list[SamplingParams]) -> None:
        if self._loop is None:
            raise RuntimeError("engine not started")
        for p in params:
            p.validate()
        if not prompt:
            raise ValueError("empty prompt")
        if len(prompt) + 1 > self.max_len:
            raise ContextOverflow(
                f"prompt of {len(prompt)} tokens leaves no room in a context of {self.max_len}"
            )

    def _sequence(
        self,
        chat: ChatKey,
        prompt: list[int],
        params: SamplingParams,
        stops: tuple[str, ...],
        hashes: list[int],
        leader: Sequence | None,
    ) -> Sequence:
        return Sequence(
            id=GenerationId(next(self._ids)),
            chat=chat,
            prompt=list(prompt),
            params=params,
            sampler=Sampler(params),
            detokenizer=self.tokenizer.detokenizer(),
            stop=StopMatcher(stops),
            eos_ids=self.tokenizer.eos_token_ids,
            max_len=self.max_len,
            prefix_hashes=hashes,
            leader=leader,
        )

    def _submit(
        self,
        chats: list[ChatKey],
        prompts: list[list[int]],
        params: list[SamplingParams],
        turn_stops: tuple[str, ...],
        *,
        fork: bool,
    ) -> list[GenerationStream]:
        """Queue the generations, all or none. ``fork``: they share ``prompts[0]`` (one prompt
        given), which the first prefills for the others."""
        for prompt in prompts:
            self._check_prompt(prompt, params)
        hashes = [prompt_hashes(prompt) for prompt in prompts]
        seqs: list[Sequence] = []
        for i, (chat, p) in enumerate(zip(chats, params, strict=True)):
            j = 0 if fork else i
            leader = seqs[0] if fork and seqs else None
            seqs.append(self._sequence(chat, prompts[j], p, (*p.stop, *turn_stops), hashes[j], leader))
        return self._queue(seqs, shared=fork)

    def _queue(self, seqs: list[Sequence], *, shared: bool) -> list[GenerationStream]:
        """Queue ``seqs``, all or none; a stream for each, but one for a beam search. ``shared``:
        they continue the first one's prompt (a fork, a beam search), whose cached estimate
        every stream reports."""
        assert self._idle is not None
        self._idle.clear()
        with self._lock:
            positions = self._scheduler.add_all(seqs)
            cached = [
                min(self._kv.peek(seq.chat, seq.prompt, seq.prefix_hashes), max(0, len(seq.prompt) - 2))
                for seq in (seqs[:1] if shared else seqs)
            ]
            if seqs[0].beam is not None:
                seqs, positions = seqs[:1], positions[:1]
            streams = [
                GenerationStream(self, seq, pos, cached[0 if shared else i])
                for i, (seq, pos) in enumerate(zip(seqs, positions, strict=True))
            ]
            for stream in streams:
                self._streams[stream.id] = stream
            self.stats.waiting = len(self._scheduler.waiting)
        self._wake.set()
        return streams

    def check(self, prompt: list[int], params: SamplingParams) -> None:
        """Raise now what :meth:`submit` would raise for this work (``InvalidParams``,
        ``ContextOverflow``, ``QueueFull``), without queueing it: for a caller that must store
        a request before it may start. ``submit`` still decides; only a race can differ."""
        params.validate()
        if len(prompt) + 1 > self.max_len:
            raise ContextOverflow(
                f"prompt of {len(prompt)} tokens leaves no room in a context of {self.max_len}"
            )
        with self._lock:
            if len(self._scheduler.waiting) >= self._scheduler.max_waiting:
                raise QueueFull(f"{len(self._scheduler.waiting)} generations already waiting")

    def cancel(self, generation: GenerationId) -> None:
        """Ask the worker to end a generation; it runs at most one more step."""
        stream = self._streams.get(generation)
        if stream is not None:
            stream._seq.cancel_requested = True
            self._wake.set()

    def forget(self, chat: ChatKey) -> None:
        """Drop a chat's cache (the chat was deleted)."""
        with self._lock:
            slot = self._kv.forget(chat)
            if slot is not None:
                self.runner.release_slot(slot)

    # ---- worker side -----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            events: list[tuple[GenerationStream, _Event]] = []
            with self._lock:
                if self._stopping:
                    self._cancel_all(events)
                    self._deliver_threadsafe(events)
                    return
                self._reap_cancelled(events)
                self._admit(events)
                self._place_due_decoders()
                step = self._scheduler.next_step(self._settle_candidate())
                self._update_gauges()
                if step is None:
                    self._wake.clear()
            if step is None:
                self._deliver_threadsafe(events)
                self._signal_idle()
                self._wake.wait()
                continue
            try:
                logits = self._forward(step)
            except Exception as exc:  # a failed run ends its generations, never the engine
                log.exception("model run failed")
                with self._lock:
                    self._fail(step, f"model run failed: {exc}", events)
            else:
                with self._lock:
                    self._postprocess(step, logits, events)
            self._deliver_threadsafe(events)

    def _settle_candidate(self) -> CacheEntry | None:
        if not self._scheduler.is_idle():
            return None
        unsettled = self._kv.unsettled()
        return unsettled[0] if unsettled else None

    def _forward(self, step: PrefillStep | DecodeStep) -> np.ndarray:
        if isinstance(step, PrefillStep):
            source = step.sequence.prompt if step.sequence is not None else step.entry.ids
            tokens = np.asarray([source[step.start : step.end]], dtype=np.int64)
            return self.runner.forward(step.entry.slot, tokens, [step.start])
        tokens = np.asarray([[s.generated[-1]] for s in step.sequences], dtype=np.int64)
        past = [len(s.prompt) + len(s.generated) - 1 for s in step.sequences]
        first = step.sequences[0].entry
        assert first is not None
        return self.runner.forward(first.slot, tokens, past)

    def _admit(self, events: list[tuple[GenerationStream, _Event]]) -> None:
        while self._scheduler.has_room():
            seq = self._scheduler.waiting[0]
            if seq.beam is not None:
                if not self._admit_beam(seq.beam):
                    return
                continue
            leader = seq.leader
            if leader is not None and leader.phase is not Phase.PREFILL and not self._can_fork(leader):
                seq.leader = leader = None  # the leader ended early or lost its cache: prefill alone
            try:
                if leader is None:
                    entry, plan, released = self._kv.acquire_for(seq.chat, seq.prompt, seq.prefix_hashes)
                else:
                    entry, released = self._kv.acquire(seq.chat)
            except NoFreeSlot:
                return
            self._release(released)
            self._scheduler.admit_next()
            seq.admitted_at = time.perf_counter()
            seq.entry = entry
            if leader is not None:
                self._kv.truncate(entry, 0)
                if self._can_fork(leader):
                    assert leader.fork_logits is not None
                    self._fork(leader, seq, leader.fork_logits, events)
                else:
                    seq.waits_for_leader = True
                continue
            self._reuse(seq, entry, plan)

    def _reuse(self, seq: Sequence, entry: CacheEntry, plan: Reuse) -> None:
        """Start ``seq``'s prompt from the longest exact prefix it may reuse."""
        cap = max(0, len(seq.prompt) - 2)  # a prefill after position 0 needs two tokens
        source = plan.source
        if source is not None and source is not entry and min(plan.length, cap) > 0:
            reuse = min(plan.length, cap)
            self.runner.copy_slot(source.slot, entry.slot, reuse)
            self._kv.record_copy(entry, source, reuse)
            seq.shared_tokens = reuse
        else:
            reuse = min(entry.reusable_prefix(seq.prompt), cap)
            self._kv.truncate(entry, reuse)
        seq.prefilled = seq.cached_tokens = reuse

    def _admit_beam(self, group: BeamGroup) -> bool:
        """Admit a beam search whole, once ``width`` places and slots are free: the first member
        prefills the prompt, the others park on empty slots until the beams split."""
        width = len(group.members)
        if not self._scheduler.has_room(width) or self._kv.available() < width:
            return False
        now = time.perf_counter()
        for index, seq in enumerate(group.members):
            if index == 0:
                entry, plan, released = self._kv.acquire_for(seq.chat, seq.prompt, seq.prefix_hashes)
            else:
                entry, released = self._kv.acquire(seq.chat)
            self._release(released)
            assert self._scheduler.waiting[0] is seq
            self._scheduler.admit_next()
            seq.admitted_at = now
            seq.entry = entry
            if index == 0:
                self._reuse(seq, entry, plan)
            else:
                self._kv.truncate(entry, 0)
                self._scheduler.park(seq)
        return True

    def _can_fork(self, leader: Sequence) -> bool:
        """Whether the leader's prompt is in its slot, exact, with its first-token logits kept."""
        entry = leader.entry
        n = len(leader.prompt)
        return (
            leader.fork_logits is not None
            and entry is not None
            and self._kv.resident(entry)
            and entry.exact >= n
            and entry.ids[:n] == leader.prompt
        )

    def _fork(
        self,
        leader: Sequence,
        seq: Sequence,
        logits: np.ndarray,
        events: list[tuple[GenerationStream, _Event]],
    ) -> None:
        """Start ``seq`` from the leader's prefilled prompt: copy it, sample from its logits."""
        assert leader.entry is not None
        assert seq.entry is not None
        n = len(seq.prompt)
        self.runner.copy_slot(leader.entry.slot, seq.entry.slot, n)
        self._kv.record_copy(seq.entry, leader.entry, n)
        seq.leader, seq.waits_for_leader = None, False
        seq.prefilled = n
        seq.cached_tokens = leader.cached_tokens
        self.stats.forked_tokens += n
        self._scheduler.start_decoding(seq)
        self._place_decoders()
        self._accept(seq, logits, events)

    def _prompt_done(
        self, seq: Sequence, logits: np.ndarray, events: list[tuple[GenerationStream, _Event]]
    ) -> None:
        """``seq``'s prompt is prefilled: start its followers (if it leads a fork), then itself;
        or, for a beam search, its first step."""
        if seq.beam is not None:
            seq.beam.live = [seq]
            self._beam_step(seq.beam, logits[None, :], events)
            return
        self._scheduler.start_decoding(seq)
        self._place_decoders()
        if any(f.leader is seq for f in self._scheduler.waiting):
            seq.fork_logits = logits.copy()  # for followers not yet admitted
        for follower in [f for f in self._scheduler.prefilling if f.leader is seq and f.waits_for_leader]:
            self._fork(seq, follower, logits, events)
        self._accept(seq, logits, events)

    def _update_gauges(self) -> None:
        self.stats.waiting = len(self._scheduler.waiting)
        self.stats.running = self._scheduler.running
        self.stats.resident_tokens = self._kv.resident_tokens()
        self.stats.unsettled_chats = len(self._kv.unsettled())
        self.stats.evictions = self._kv.evictions

    def _postprocess(
        self,
        step: PrefillStep | DecodeStep,
        logits: np.ndarray,
        events: list[tuple[GenerationStream, _Event]],
    ) -> None:
        self.stats.steps += 1
        if isinstance(step, PrefillStep):
            entry = step.entry
            chunk = (step.sequence.prompt if step.sequence is not None else entry.ids)[step.start : step.end]
            if step.sequence is None:
                self._kv.record_settled(entry, step.end)
                self.stats.settled_tokens += step.end - step.start
                return
            self._kv.record_prefill(entry, step.start, chunk)
            seq = step.sequence
            seq.prefilled = step.end
            self.stats.prefill_tokens += step.end - step.start
            if seq.prefilled == len(seq.prompt):
                self.stats.cached_tokens += seq.cached_tokens
                self.stats.shared_tokens += seq.shared_tokens
                self._prompt_done(seq, logits[0], events)
            return
        self.stats.decode_steps += 1
        self.stats.decode_rows += len(step.sequences)
        self.stats.max_decode_batch = max(self.stats.max_decode_batch, len(step.sequences))
        beams: dict[BeamGroup, dict[Sequence, int]] = {}
        for row, seq in enumerate(step.sequences):
            assert seq.entry is not None
            seq.entry.ids.append(seq.generated[-1])
            if seq.beam is not None:
                beams.setdefault(seq.beam, {})[seq] = row
            else:
                self._accept(seq, logits[row], events)
        for group, rows in beams.items():
            self.stats.beam_rows += len(rows)
            self._beam_step(group, logits[[rows[seq] for seq in group.live]], events)

    def _beam_step(
        self, group: BeamGroup, logits: np.ndarray, events: list[tuple[GenerationStream, _Event]]
    ) -> None:
        """One step of a beam search: ``logits[i]`` belong to ``group.live[i]``. A parent with
        children keeps its sequence and slot for the first; each other child takes a sequence
        that carries no surviving beam, and a copy of its parent's cache."""
        if group.first_step_at is None:
            group.first_step_at = time.perf_counter()
        try:
            outcome = group.search.step(logits)
        except Exception as exc:
            log.exception("beam search %s failed after the model run", group.leader.id)
            self._end_beam(group, FinishReason.ERROR, f"beam search failed: {exc}", events)
            return
        parents = group.live
        first_child: dict[int, int] = {}
        for index, child in enumerate(outcome.children):
            first_child.setdefault(child.parent, index)
        keeping = {parents[p] for p in first_child}
        spare = [m for m in group.members if m not in keeping]
        live: list[Sequence] = []
        for index, child in enumerate(outcome.children):
            parent = parents[child.parent]
            if first_child[child.parent] == index:
                live.append(parent)
                continue
            seq = spare.pop()
            assert parent.entry is not None
            assert seq.entry is not None
            self.runner.copy_slot(parent.entry.slot, seq.entry.slot, len(parent.entry.ids))
            self._kv.record_clone(seq.entry, parent.entry)
            seq.generated = [*parent.generated, child.token]
            live.append(seq)
        for parent_index, child_index in first_child.items():
            parents[parent_index].generated.append(outcome.children[child_index].token)
        self.stats.generated_tokens += len(outcome.children)
        group.live = live
        if outcome.over:
            self._end_beam(group, None, None, events)
            return
        for seq in group.members:
            if seq in live:
                self._scheduler.activate(seq)
            else:
                self._scheduler.park(seq)
        self._place_decoders()
        delta = group.advance()
        if delta is not None:
            events.append((self._streams[group.leader.id], delta))

    def _end_beam(
        self,
        group: BeamGroup,
        reason: FinishReason | None,
        error: str | None,
        events: list[tuple[GenerationStream, _Event]],
    ) -> None:
        """End a beam search: its winner (``reason`` None: it ran to its end), or cancelled or
        failed; every member leaves the batch and gives its slot back."""
        if group.ended:
            return
        group.ended = True
        for seq in group.members:
            seq.finish(reason or FinishReason.STOP, error)
            self._scheduler.remove(seq)
            if seq.entry is not None:
                self._release(self._kv.release(seq.entry))
        self._place_decoders()
        stream = self._streams.pop(group.leader.id)
        events.append((stream, group.result(reason, error)))

    def _accept(
        self, seq: Sequence, logits: np.ndarray, events: list[tuple[GenerationStream, _Event]]
    ) -> None:
        try:
            delta = seq.accept(logits)
        except Exception as exc:  # sampling or detokenizing failed: end this generation only
            log.exception("generation %s failed after the model run", seq.id)
            self._finish(seq, FinishReason.ERROR, f"sampling failed: {exc}", events)
            return
        self.stats.generated_tokens += 1
        stream = self._streams[seq.id]
        if delta is not None:
            events.append((stream, delta))
        if seq.reason is not None:
            self._finish(seq, seq.reason, None, events)

    def _finish(
        self,
        seq: Sequence,
        reason: FinishReason,
        error: str | None,
        events: list[tuple[GenerationStream, _Event]],
    ) -> None:
        was_decoding = seq.phase is Phase.DECODE
        seq.finish(reason, error)
        for follower in self._scheduler.prefilling:
            if follower.leader is seq and follower.waits_for_leader:  # prefill on its own after all
                follower.leader, follower.waits_for_leader = None, False
        self._scheduler.remove(seq)
        if was_decoding:
            self._place_decoders()
        if seq.entry is not None:
            self._release(self._kv.release(seq.entry))
        stream = self._streams.pop(seq.id)
        if (tail := seq.silent_tail()) is not None:
            events.append((stream, tail))
        events.append((stream, seq.result()))

    def _place_decoders(self) -> None:
        """Decoding sequences must sit in one ascending run of slots, in order, before the next
        decode step (one step binds one range). The moves wait for the worker's next pass,
        after this step's tokens have gone out: a move swaps whole caches (a 1000-position
        idle chat takes ~80 ms on 2 cores), and a first token should not wait for it."""
        self._placement_due = True

    def _place_due_decoders(self) -> None:
        """Compact the decoders into slots 0..n-1 unless they already form one run (a lone
        decoder always does: it decodes where it prefilled, nothing moves)."""
        if not self._placement_due:
            return
        self._placement_due = False
        slots = [seq.entry.slot for seq in self._scheduler.decoding if seq.entry is not None]
        if not slots or slots == list(range(slots[0], slots[0] + len(slots))):
            return
        for index, seq in enumerate(self._scheduler.decoding):
            assert seq.entry is not None
            if seq.entry.slot != index:
                other = self._kv.by_slot[index]
                self.runner.swap_slots(
                    index, seq.entry.slot, len(other.ids) if other else 0, len(seq.entry.ids)
                )
                self.stats.slot_moves += 1
                self._kv.swap(index, seq.entry.slot)

    def _release(self, slots: list[int]) -> None:
        for slot in slots:
            self.runner.release_slot(slot)

    def _containers(self) -> tuple[list[Sequence] | deque[Sequence], ...]:
        s = self._scheduler
        return (s.waiting, s.prefilling, s.decoding, s.parked)

    def _end(
        self,
        seq: Sequence,
        reason: FinishReason,
        error: str | None,
        events: list[tuple[GenerationStream, _Event]],
    ) -> None:
        """End a generation, or the whole beam search ``seq`` is a beam of."""
        if seq.beam is not None:
            self._end_beam(seq.beam, reason, error, events)
        else:
            self._finish(seq, reason, error, events)

    def _reap_cancelled(self, events: list[tuple[GenerationStream, _Event]]) -> None:
        for container in self._containers():
            for seq in [s for s in container if s.cancel_requested]:
                self._end(seq, FinishReason.CANCELLED, None, events)

    def _cancel_all(self, events: list[tuple[GenerationStream, _Event]]) -> None:
        for container in self._containers():
            for seq in list(container):
                self._end(seq, FinishReason.CANCELLED, None, events)

    def _fail(
        self, step: PrefillStep | DecodeStep, message: str, events: list[tuple[GenerationStream, _Event]]
    ) -> None:
        if isinstance(step, PrefillStep):
            self._kv.truncate(step.entry, step.start)
            if step.sequence is not None:
                self._end(step.sequence, FinishReason.ERROR, message, events)
            return
        for seq in step.sequences:
            self._end(seq, FinishReason.ERROR, message, events)

    def _signal_idle(self) -> None:
        loop, idle = self._loop, self._idle
        if loop is not None and idle is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._set_idle_unless_busy)

    def _set_idle_unless_busy(self) -> None:
        """Runs on the loop: a submit that raced the worker's last look keeps it busy."""
        with self._lock:
            busy = not self._scheduler.is_idle() or bool(self._kv.unsettled())
        if not busy and self._idle is not None:
            self._idle.set()

    def _deliver_threadsafe(self, events: list[tuple[GenerationStream, _Event]]) -> None:
        if events and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(_deliver, events)


def _deliver(events: list[tuple[GenerationStream, _Event]]) -> None:
    for stream, event in events:
        try:
            stream._put(event)
        except Exception:  # a failing listener must not cost other generations their events
            log.exception("delivering an event of generation %s failed", stream.id)
