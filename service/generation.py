"""One reply being generated: pumps the engine's deltas to whichever session holds it,
keeps them for replay, and stores the result once, whatever ends it.

A generation outlives its connection for the disconnect grace period: it is detached
from the dropped session, keeps running, and can be attached to a new session (``open``
with ``resume``), which first gets the token frames it missed and then the live ones.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from uuid import UUID

from service.engine.engine import GenerationStream
from service.engine.types import Delta, FinishReason, GenerationResult
from service.metrics import CancelCause, Metrics
from service.outbox import Outbox
from service.protocol import frames
from service.protocol.errors import ErrorCode

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Sink:
    """Where a generation's frames go: one session of one connection."""

    outbox: Outbox
    session: str


Finisher = Callable[["Generation", GenerationResult], Awaitable[None]]


class Generation:
    def __init__(
        self,
        *,
        message_id: UUID,
        chat_id: UUID,
        user_id: UUID,
        prompt_ids: list[int],
        stream: GenerationStream,
        sink: Sink,
        metrics: Metrics,
        on_finish: Finisher,
        sent_at: float,
    ) -> None:
        self.message_id = message_id
        self.chat_id = chat_id
        self.user_id = user_id
        self.prompt_ids = prompt_ids
        self.stream = stream
        self.result: GenerationResult | None = None
        self._sink: Sink | None = sink
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
        return self._sink is not None

    def cancel(self, cause: CancelCause) -> None:
        """End the generation; the engine runs at most one more step for it."""
        if self._cancel_cause is None and self.result is None:
            self._cancel_cause = cause
            self.stream.cancel()

    def detach(self, grace_s: float) -> None:
        """The session is gone: keep running for ``grace_s`` seconds, then cancel."""
        self._sink = None
        if grace_s <= 0:
            self.cancel(CancelCause.DISCONNECT)
        else:
            loop = asyncio.get_running_loop()
            self._grace_timer = loop.call_later(grace_s, self.cancel, CancelCause.DISCONNECT)

    def attach(self, sink: Sink, from_index: int) -> None:
        """Send ``sink`` the token frames from ``from_index`` on, then the live ones."""
        if self._grace_timer is not None:
            self._grace_timer.cancel()
            self._grace_timer = None
        for delta in self._deltas:
            if delta.index + delta.tokens > from_index:
                sink.outbox.put_token(sink.session, delta)
        self._sink = sink

    def _on_event(self, event: Delta | GenerationResult) -> None:
        """Runs on the event loop for every delta, then once with the result."""
        if isinstance(event, GenerationResult):
            self.result = event
            self._finishing = asyncio.create_task(self._finish(event), name=f"finish-{self.message_id}")
            return
        now = time.perf_counter()
        if self._last_delta_at is None:
            self._metrics.ttft.observe(now - self._sent_at)
        else:
            self._metrics.inter_token.observe(now - self._last_delta_at)
        self._last_delta_at = now
        self._deltas.append(event)
        if self._sink is not None:
            self._sink.outbox.put_token(self._sink.session, event)

    async def _finish(self, result: GenerationResult) -> None:
        """Store the reply (before ``done``, so a client that reads history after ``done``
        finds it), then tell the session holding it, if any."""
        self._record(result)
        try:
            await self._on_finish(self, result)
        except Exception:
            log.exception("storing the reply %s failed", self.message_id)
        finally:
            if self._grace_timer is not None:
                self._grace_timer.cancel()
            if self._sink is not None:
                self._sink.outbox.put(self._done_frame(self._sink.session, result))
            self.done.set()

    def _record(self, result: GenerationResult) -> None:
        m = self._metrics
        m.generations.labels(reason=result.reason.value).inc()
        m.generated_tokens.inc(result.completion_tokens)
        m.prompt_tokens.labels(source="cache").inc(result.cached_tokens)
        m.prompt_tokens.labels(source="computed").inc(result.prompt_tokens - result.cached_tokens)
        if result.reason is FinishReason.CANCELLED and self._cancel_cause is not None:
            m.cancellations.labels(cause=self._cancel_cause.value).inc()

    def _done_frame(self, session: str, result: GenerationResult) -> frames.DoneFrame:
        error = None
        if result.reason is FinishReason.ERROR:
            error = frames.ErrorBody(
                code=ErrorCode.INTERNAL.value, message=result.error or "generation failed"
            )
        return frames.done(
            session=session,
            message=str(self.message_id),
            reason=result.reason.value,
            usage=frames.Usage(
                prompt_tokens=result.prompt_tokens,
                cached_tokens=result.cached_tokens,
                completion_tokens=result.completion_tokens,
            ),
            timing=frames.Timing(
                queued_ms=round(result.queued_ms, 3),
                ttft_ms=None if result.ttft_ms is None else round(result.ttft_ms, 3),
                total_ms=round(result.total_ms, 3),
                tokens_per_s=round(result.tokens_per_s, 3),
            ),
            error=error,
        )
