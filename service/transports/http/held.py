"""The replies one HTTP request holds: their events through one queue, in the order they come,
and their cancellation when the client goes away.

A streaming response cancels them in the ``finally`` of its event generator (sse-starlette
closes it when the client disconnects); a whole-answer response waits in :meth:`HeldReplies.wait`,
which watches for the disconnect meanwhile. Either way the cancellation is ``Reply.cancel``, the
one ``stop`` uses, so the engine runs at most one more step for them.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from starlette.requests import Request

from service.core.metrics import CancelCause
from service.core.reply import Reply
from service.engine.types import Delta, GenerationResult

Event = tuple[int, Delta | GenerationResult]
"""A reply's delta or end, with the reply's place in the request (its choice or prompt index)."""


@dataclass(slots=True)
class QueueSink:
    """Hands one reply's deltas and end to the request's queue."""

    queue: asyncio.Queue[Event]
    index: int

    def delta(self, delta: Delta) -> None:
        self.queue.put_nowait((self.index, delta))

    def done(self, reply: Reply, result: GenerationResult) -> None:
        self.queue.put_nowait((self.index, result))


class HeldReplies:
    """``replies``, attached to one queue as they are given (the index of each is its place)."""

    def __init__(self, replies: list[Reply]) -> None:
        self.replies = replies
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        for index, reply in enumerate(replies):
            reply.attach(QueueSink(self.queue, index))

    async def next(self) -> Event:
        return await self.queue.get()

    def cancel(self, cause: CancelCause) -> None:
        """Cancel the replies still running."""
        for reply in self.replies:
            if not reply.done.is_set():
                reply.cancel(cause)

    async def wait(self, request: Request) -> list[GenerationResult]:
        """Every reply's result, in order, once all have ended; a client that leaves meanwhile
        cancels them (their results then say ``cancelled``)."""
        ended: asyncio.Future[list[bool]] = asyncio.ensure_future(
            asyncio.gather(*(r.done.wait() for r in self.replies))
        )
        left: asyncio.Future[None] = asyncio.ensure_future(disconnected(request))
        try:
            await asyncio.wait([ended, left], return_when=asyncio.FIRST_COMPLETED)  # type: ignore[type-var]
        finally:
            left.cancel()
            if not ended.done():
                self.cancel(CancelCause.DISCONNECT)
            await ended
        return [r.result for r in self.replies if r.result is not None]


async def disconnected(request: Request) -> None:
    """Return once the client has gone (the request's body must have been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
