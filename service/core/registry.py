"""The running replies of a server, by message id: what shutdown drain, chat deletion, user
revocation, ``resume`` and the REST chat API's readers reach. A reply stays here until its
result is recorded."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from uuid import UUID

from service.core.metrics import CancelCause
from service.core.reply import Reply


class Replies:
    def __init__(self, on_change: Callable[[], None] = lambda: None) -> None:
        self.running: dict[UUID, Reply] = {}
        self._on_change = on_change

    def __len__(self) -> int:
        return len(self.running)

    def track(self, reply: Reply) -> None:
        self.running[reply.message_id] = reply
        self._on_change()

    def forget(self, reply: Reply) -> None:
        self.running.pop(reply.message_id, None)

    def of_user(self, user_id: UUID) -> list[Reply]:
        return [r for r in self.running.values() if r.user_id == user_id]

    def of_chat(self, user_id: UUID, chat_id: UUID) -> list[Reply]:
        """The replies of this user's chat still running or being stored."""
        return [r for r in self.running.values() if r.user_id == user_id and r.chat_id == chat_id]

    def find(self, message_id: UUID | None, user_id: UUID, chat_id: UUID) -> Reply | None:
        """The reply ``message_id`` of this user's chat while it runs or is being stored,
        whoever holds it."""
        reply = None if message_id is None else self.running.get(message_id)
        if reply is None or reply.user_id != user_id or reply.chat_id != chat_id:
            return None
        return reply

    def detached(self, message_id: UUID | None, user_id: UUID, chat_id: UUID) -> Reply | None:
        """A running reply of this user's chat that no client holds."""
        reply = None if message_id is None else self.running.get(message_id)
        if (
            reply is None
            or reply.attached
            or reply.result is not None
            or reply.user_id != user_id
            or reply.chat_id != chat_id
        ):
            return None
        return reply

    async def cancel(self, replies: list[Reply], cause: CancelCause) -> None:
        """Cancel ``replies`` and wait until each is recorded."""
        for reply in replies:
            reply.cancel(cause)
        await asyncio.gather(*(r.done.wait() for r in replies))

    async def finish(self, timeout_s: float) -> int:
        """Give the running replies up to ``timeout_s`` to end; how many are still running."""
        waiters = [asyncio.ensure_future(r.done.wait()) for r in self.running.values()]
        if not waiters:
            return 0
        _, pending = await asyncio.wait(waiters, timeout=timeout_s)
        for waiter in pending:
            waiter.cancel()
        return len(pending)

    async def idle(self) -> None:
        """Wait until no reply is running and every result is recorded."""
        while self.running:
            await asyncio.gather(*(r.done.wait() for r in list(self.running.values())))
