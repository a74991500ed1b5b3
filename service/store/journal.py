"""A write-behind journal: the writes of a turn survive the database going away for a while.

Why: a reply is generated in memory whatever the database does, and PostgreSQL restarts (an
upgrade, a failover, a crash) take seconds. Failing every ``send`` meanwhile, or losing the
replies that end meanwhile, would turn a short database outage into lost conversations. So each
write the service cannot do without is handed to this journal as a replayable thunk:

- **Database up, nothing pending**: the write runs at once and the caller awaits it, exactly as
  without a journal (``True`` comes back: the write is in the database).
- **The write fails as "unavailable"** (:class:`~service.errors.StoreUnavailable`: connection
  refused or lost, the server shutting down or starting up, an attempt past its timeout): it is
  kept in memory and retried in the background with capped exponential backoff, and the caller
  goes on (``False`` comes back: the write is queued).
- **Writes already pending**: a new write queues behind them without trying, so writes reach the
  database in the order they were accepted (a reply's completion never overtakes the insert of its
  placeholder row). Writes that do not depend on each other may still run side by side on the
  direct path; a dependent write is only issued once its predecessor came back (stored or queued).
- **Any other error** (the write itself is refused: a deleted chat, a constraint) goes to the
  caller on the direct path; in the background it cannot go anywhere, so the write is logged
  loudly and dropped rather than blocking every write behind it forever.

Replayed writes must be idempotent (the store's writes carry ids made in Python and insert with
``ON CONFLICT DO NOTHING``): an attempt cut off after its commit but before its answer is retried.

Memory is bounded: past ``max_pending`` queued writes, writes of *new* work (``new_work=True``:
a new chat, a new turn) are refused with :class:`~service.errors.WriteBacklogFull` (the server
answers ``overloaded``); writes that finish work already started are always accepted (their
number is bounded by the turns accepted before). The journal lives in this process only: what is
still pending when :meth:`WriteJournal.close` gives up is logged, one line per write, and lost.

No database library here: the journal only knows thunks and the service's error tree.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

from service.errors import StoreError, StoreUnavailable, WriteBacklogFull

log = logging.getLogger(__name__)

DEFAULT_MAX_PENDING: Final = 10_000
DEFAULT_ATTEMPT_TIMEOUT_S: Final = 5.0
BACKOFF_INITIAL_S: Final = 0.1
BACKOFF_MAX_S: Final = 2.0
_STILL_WAITING_LOG_EVERY_S: Final = 30.0
_KICKED_RETRY_FLOOR_S: Final = 0.05

Write = Callable[[], Awaitable[None]]
"""One write as a thunk: each call makes one attempt (so it can be retried)."""


@dataclass(slots=True)
class _Pending:
    label: str  # what the write is, for the logs ("reply <id>", "turn <id> of chat <id>", ...)
    write: Write
    queued_at: float = field(default_factory=time.monotonic)
    attempts: int = 0


class WriteJournal:
    """Ordered, retried, bounded writes; see the module docstring for the rules."""

    def __init__(
        self,
        *,
        max_pending: int = DEFAULT_MAX_PENDING,
        attempt_timeout_s: float = DEFAULT_ATTEMPT_TIMEOUT_S,
        backoff_initial_s: float = BACKOFF_INITIAL_S,
        backoff_max_s: float = BACKOFF_MAX_S,
        on_unavailable: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.max_pending = max_pending
        self.attempt_timeout_s = attempt_timeout_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.dropped = 0  # writes the database refused on replay (logged)
        self.last_error: str | None = None  # why the last attempt failed, while writes are pending
        self._on_unavailable = on_unavailable
        self._queue: deque[_Pending] = deque()
        self._drained = asyncio.Event()
        self._drained.set()
        self._kick = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False
        self._outage_started: float | None = None

    @property
    def pending(self) -> int:
        """How many writes are waiting for the database."""
        return len(self._queue)

    async def write(self, label: str, write: Write, *, new_work: bool) -> bool:
        """Store ``write``: ``True`` once it is in the database, ``False`` once it is queued.

        Raises what the write raises when the database refuses it on the direct path,
        :class:`WriteBacklogFull` for new work past the bound, and :class:`StoreError` once closed.
        """
        if self._closed:
            raise StoreError(f"the store is closed; cannot write {label}")
        if new_work and len(self._queue) >= self.max_pending:
            raise WriteBacklogFull(
                f"{len(self._queue)} writes are already waiting for the database; try again later"
            )
        if self._queue:
            self._enqueue(_Pending(label, write))
            return False
        try:
            await self._attempt(write)
        except (StoreUnavailable, TimeoutError) as exc:
            await self._unavailable(exc)
            self._enqueue(_Pending(label, write, attempts=1))
            return False
        return True

    def kick(self) -> None:
        """Retry the oldest pending write now rather than at the end of its backoff (someone asked)."""
        self._kick.set()

    async def drained(self) -> None:
        """Return once no write is pending (at once when none is)."""
        await self._drained.wait()

    async def close(self, *, flush_timeout_s: float) -> list[str]:
        """Refuse new writes, try to store the pending ones for ``flush_timeout_s``, then give up.

        Returns (and logs, one error line each) the labels of the writes that were lost.
        """
        self._closed = True
        if self._queue:
            log.warning(
                "closing the store with %d write(s) pending; flushing for up to %.1f s",
                len(self._queue),
                flush_timeout_s,
            )
            self.kick()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(flush_timeout_s):
                    await self.drained()
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        now = time.monotonic()
        for pending in self._queue:
            log.error(
                "LOST: %s was never stored (waited %.1f s, %d attempt(s); last error: %s)",
                pending.label,
                now - pending.queued_at,
                pending.attempts,
                self.last_error,
            )
        lost = [pending.label for pending in self._queue]
        if lost:
            log.error("%d write(s) could not be stored before shutdown and are lost", len(lost))
        self._queue.clear()
        self._drained.set()
        return lost

    # ---- internals -----------------------------------------------------------------------

    async def _attempt(self, write: Write) -> None:
        async with asyncio.timeout(self.attempt_timeout_s):
            await write()

    async def _unavailable(self, exc: BaseException) -> None:
        self.last_error = str(exc) or type(exc).__name__
        if self._on_unavailable is not None:
            try:
                await self._on_unavailable()
            except Exception:
                log.exception("resetting the database connections failed")

    def _enqueue(self, pending: _Pending) -> None:
        if not self._queue and self._outage_started is None:
            self._outage_started = time.monotonic()
            log.warning(
                "database unavailable (%s): keeping writes in memory and retrying until it returns",
                self.last_error,
            )
        self._queue.append(pending)
        self._drained.clear()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="store-journal-flush")

    async def _flush(self) -> None:
        """Store the pending writes oldest first; retry the oldest until it goes through."""
        delay = self.backoff_initial_s
        last_report = time.monotonic()
        stored = 0
        while self._queue:
            pending = self._queue[0]
            if pending.attempts:
                await self._sleep(delay)
                delay = min(delay * 2, self.backoff_max_s)
            pending.attempts += 1
            try:
                await self._attempt(pending.write)
            except (StoreUnavailable, TimeoutError) as exc:
                await self._unavailable(exc)
                if time.monotonic() - last_report >= _STILL_WAITING_LOG_EVERY_S:
                    last_report = time.monotonic()
                    log.warning(
                        "database still unavailable (%s): %d write(s) waiting",
                        self.last_error,
                        len(self._queue),
                    )
                continue
            except StoreError as exc:
                self.dropped += 1
                log.error("the database refused %s on replay; dropping it: %s", pending.label, exc)
            except Exception:
                self.dropped += 1
                log.exception("replaying %s failed; dropping it", pending.label)
            else:
                stored += 1
            self._queue.popleft()
            delay = self.backoff_initial_s
        self._report_recovery(stored)
        self.last_error = None
        self._drained.set()

    async def _sleep(self, delay: float) -> None:
        """Sleep ``delay``, or less when kicked (a kick since the last attempt counts), but at
        least ``_KICKED_RETRY_FLOOR_S``: however many readers ask, retries stay few."""
        started = time.monotonic()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._kick.wait()
        self._kick.clear()
        rest = min(delay, _KICKED_RETRY_FLOOR_S) - (time.monotonic() - started)
        if rest > 0:
            await asyncio.sleep(rest)

    def _report_recovery(self, stored: int) -> None:
        if self._outage_started is not None:
            log.warning(
                "database available again: %d pending write(s) stored after %.1f s",
                stored,
                time.monotonic() - self._outage_started,
            )
            self._outage_started = None
