"""One reply being generated, owned from submit to its stored end.

It pumps the engine's deltas to the sinks that hold it (a ``chat.v1`` session, HTTP
responses), keeps them for replay, counts it in the metrics and records the result once,
whatever ends it. A reply outlives a dropped WebSocket connection for the disconnect grace
period: it is detached, keeps running, and can be attached to a new sink, which first gets
the deltas it missed and then the live ones. A reply started by the REST chat API is
``independent``: it runs to its end whether or not anyone holds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol
from uuid import UUID

from service.core.metrics import CancelCause, Metrics
from service.engine.engine import GenerationStream
from service.engine.types import Delta, FinishReason, GenerationResult
from service.protocol import frames

log = logging.getLogger(__name__)


def usage_of(result: GenerationResult) -> frames.Usage:
    """A finished reply's ``usage``, as every transport reports it."""
    return frames.Usage(
        prompt_tokens=result.prompt_tokens,
        cached_tokens=result.cached_tokens,
        completion_tokens=result.completion_tokens,
    )


def timing_of(result: GenerationResult) -> frames.Timing:
    """A finished reply's ``timing`` (milliseconds and tokens/s, to three decimals)."""
    return frames.Timing(
        queued_ms=round(result.queued_ms, 3),
        ttft_ms=None if result.ttft_ms is None else round(result.ttft_ms, 3),
        total_ms=round(result.total_ms, 3),
        tokens_per_s=round(result.tokens_per_s, 3),
    )


class ReplySink(Protocol):
    """Where a reply's events go while a client holds it."""

    def delta(self, delta: Delta) -> None: ...

    def done(self, reply: Reply, result: GenerationResult) -> None:
        """The reply ended and its result is recorded."""


Finisher = Callable[["Reply", GenerationResult], Awaitable[None]]


class Reply:
    def __init__(
        self,
        *,
        message_id: UUID,
        chat_id: UUID | None,
        user_id: UUID,
        prompt_ids: list[int],
        stream: GenerationStream,
        metrics: Metrics,
        on_finish: Finisher,
        sent_at: float,
    ) -> None:
        self.message_id = message_id
        self.chat_id = chat_id  # None: a stateless request, kept in no chat
        self.user_id = user_id
        self.prompt_ids = prompt_ids
        self.stream = stream
        self.result: GenerationResult | None = None
        self.abandoned = False  # refused after submit (its turn could not be stored): record nothing
        # Set once the reply's place is stored (at once for a stateless reply): a reply that
        # ends sooner is recorded only then.
        self.placed = asyncio.Event()
        self.user_message_id: UUID | None = None  # a chat turn's: the user message it answers
        self.independent = False  # never cancelled for want of a reader (see detach)
        self._sinks: list[ReplySink] = []
        self._metrics = metrics
        self._on_finish = on_finish
        self._sent_at = sent_at
        self._deltas: list[Delta] = []
        self._cancel_cause: CancelCause | None = None
        self._grace_timer: asyncio.TimerHandle | None = None
        self._last_delta_at: float | None = None
        self._finishing: asyncio.Task[None] | None = None
        self.done = asyncio.Event()
        stream.listen(self._on_event)

    @property
    def attached(self) -> bool:
        return bool(self._sinks)

    @property
    def deltas(self) -> list[Delta]:
        """Every delta so far, in order: together they cover the generated tokens once."""
        return list(self._deltas)

    @property
    def generated_tokens(self) -> int:
        return self.stream.generated_tokens

    def cancel(self, cause: CancelCause) -> None:
        """End the reply; the engine runs at most one more step for it."""
        if self._cancel_cause is None and self.result is None:
            self._cancel_cause = cause
            self.stream.cancel()

    def abandon(self) -> None:
        """The request was refused after the engine took it: cancel it, count and store nothing."""
        self.abandoned = True
        self._sinks.clear()
        self.placed.set()
        self.stream.cancel()

    def detach(self, grace_s: float, sink: ReplySink | None = None) -> None:
        """The client of ``sink`` (of every sink, when None) is gone: once no sink holds the
        reply, it keeps running for ``grace_s`` seconds, then is cancelled (an ``independent``
        reply runs on to its end)."""
        if sink is None:
            self._sinks.clear()
        else:
            with contextlib.suppress(ValueError):
                self._sinks.remove(sink)
        if self._sinks or self.independent:
            return
        if grace_s <= 0:
            self.cancel(CancelCause.DISCONNECT)
        else:
            if self._grace_timer is not None:
                self._grace_timer.cancel()
            loop = asyncio.get_running_loop()
            self._grace_timer = loop.call_later(grace_s, self.cancel, CancelCause.DISCONNECT)

    def attach(self, sink: ReplySink, from_index: int = 0) -> None:
        """Send ``sink`` the deltas from token ``from_index`` on, then the live ones (and the
        end, if it has come already). Several sinks may hold a reply at once."""
        if self._grace_timer is not None:
            self._grace_timer.cancel()
            self._grace_timer = None
        for delta in self._deltas:
            if delta.index + delta.tokens > from_index:
                sink.delta(delta)
        self._sinks.append(sink)
        if self.done.is_set() and self.result is not None:
            sink.done(self, self.result)

    def _on_event(self, event: Delta | GenerationResult) -> None:
        """Runs on the event loop for every delta, then once with the result."""
        if isinstance(event, GenerationResult):
            self.result = event
            self._finishing = asyncio.create_task(self._finish(event), name=f"finish-{self.message_id}")
            return
        if self.abandoned:
            return
        now = time.perf_counter()
        if self._last_delta_at is None:
            self._metrics.ttft.observe(now - self._sent_at)
        else:
            self._metrics.inter_token.observe(now - self._last_delta_at)
        self._last_delta_at = now
        self._deltas.append(event)
        for sink in self._sinks:
            sink.delta(event)

    async def _finish(self, result: GenerationResult) -> None:
        """Record the reply (before ``done``, so a client that reads history after ``done``
        finds it), then tell the sink holding it, if any."""
        if not self.abandoned:
            self._count(result)
        try:
            await self._on_finish(self, result)
        except Exception:
            log.exception("storing the reply %s failed", self.message_id)
        finally:
            if self._grace_timer is not None:
                self._grace_timer.cancel()
            for sink in list(self._sinks):
                sink.done(self, result)
            self.done.set()

    def _count(self, result: GenerationResult) -> None:
        m = self._metrics
        m.generations.labels(reason=result.reason.value).inc()
        m.generated_tokens.inc(result.completion_tokens)
        m.prompt_tokens.labels(source="cache").inc(result.cached_tokens)
        m.prompt_tokens.labels(source="computed").inc(result.prompt_tokens - result.cached_tokens)
        if result.reason is FinishReason.CANCELLED and self._cancel_cause is not None:
            m.cancellations.labels(cause=self._cancel_cause.value).inc()
