"""The store the server runs on: a :class:`Store` whose turn writes survive a database outage.

Why a subclass: the server calls the same methods whether the database is up or not, and the
``users`` commands, migrations and tests keep the plain :class:`Store`. What changes here:

- **Writes of a turn** (``create_chat``, ``begin_turn``, ``finish_message``) go through a
  :class:`~service.store.journal.WriteJournal`. With the database up they are awaited as before:
  the user's message is stored before generation starts, the reply before ``done`` is sent. With
  it down they are kept in order in memory and retried until it returns, and the caller goes on
  with values made in Python (the ids are made up front for that: a new chat's id, its system
  message's, the user message's, the creation time), so ``open`` of a new chat still answers
  ``opened``, ``send`` still streams, and ``done`` is sent as soon as the reply is *queued*. It
  does not wait for the database (that could be forever): the reply is durable only once the
  journal drains, and is lost if this process dies first (logged loudly at shutdown).
- **Reads** (``get_chat``, ``messages``, ``reply``, ``list_chats``, ``delete_chat``) are refused with
  :class:`StoreUnavailable` while writes are pending, even once the database answers again, so
  no client ever reads a history that lacks a message it was told about (read-your-writes holds
  across the outage); each refusal also asks the journal to retry now.
- **Failures are classified** from the database error behind each :class:`StoreError`: the
  connection (SQLSTATE class 08, or none at all: refused, reset, timed out), the server shutting
  down or starting up (57), resources (53), a transaction conflict (40) and a login refused
  while the server restarts (28, 3D) are *unavailable*, worth retrying; a write the database
  refuses for what it is (22 data, 23 constraint, 42 rule) is not.
- **After a restart** the pool's connections are dead and the first query on each fails: on an
  *unavailable* error every pooled connection is expired (asyncpg reconnects on the next
  acquire), and a read that failed on a dead connection is retried once on a fresh one.
- ``ping`` (``/readyz``) fails while writes are pending, and ``close`` flushes them for a
  bounded time first, logging each one it could not store.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Final, TypeVar
from uuid import UUID

import asyncpg

from service.errors import StoreError, StoreUnavailable
from service.store.journal import WriteJournal
from service.store.records import (
    Chat,
    ChatSummary,
    Completion,
    StoredMessage,
    StoredReply,
    User,
)
from service.store.store import Store, _pg_text

log = logging.getLogger(__name__)

DEFAULT_FLUSH_TIMEOUT_S: Final = 10.0
"""How long ``close`` keeps trying to store pending writes before it gives them up."""

# SQLSTATE classes of failures that are about the database's state, not about the statement.
_UNAVAILABLE_CLASSES: Final = frozenset({"08", "28", "3D", "40", "53", "57"})
_NOT_UNAVAILABLE: Final = frozenset({"57014"})  # query_canceled: a statement timeout, not an outage

T = TypeVar("T")


def is_unavailable(exc: BaseException | None) -> bool:
    """Whether the database failure ``exc`` (what a :class:`StoreError` was raised from) may pass."""
    if isinstance(exc, StoreUnavailable):
        return True
    if isinstance(exc, OSError | asyncpg.InterfaceError):  # refused, reset, timed out, pool closing
        return True
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = str(getattr(exc, "sqlstate", "") or "")
        return sqlstate[:2] in _UNAVAILABLE_CLASSES and sqlstate not in _NOT_UNAVAILABLE
    return False


def _dead_connection(exc: BaseException | None) -> bool:
    """A failure of a pooled connection the server dropped (not a refused new connection)."""
    return isinstance(exc, asyncpg.InterfaceError | asyncpg.PostgresConnectionError) or (
        isinstance(exc, asyncpg.PostgresError) and str(getattr(exc, "sqlstate", "")).startswith("57P")
    )


async def _classified(call: Awaitable[T]) -> T:
    """``await call``, raising :class:`StoreUnavailable` for a failure that retrying may cure."""
    try:
        return await call
    except StoreUnavailable:
        raise
    except StoreError as exc:
        if is_unavailable(exc.__cause__):
            raise StoreUnavailable(str(exc)) from exc.__cause__
        raise


class DurableStore(Store):
    """A :class:`Store` that keeps a turn's writes in memory while the database is away."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        super().__init__(pool)
        self.journal = WriteJournal(on_unavailable=self._expire_connections)
        self.flush_timeout_s = DEFAULT_FLUSH_TIMEOUT_S

    @property
    def pending_writes(self) -> int:
        return self.journal.pending

    # ---- writes: journaled ---------------------------------------------------------------

    async def _write_new(self, label: str, write: Callable[[], Awaitable[T]], queued: Callable[[], T]) -> T:
        """New work through the journal: what ``write`` stored, or (the database away, the write
        queued) what ``queued`` says it will store."""
        stored: list[T] = []

        async def attempt() -> None:
            stored.append(await _classified(write()))

        if await self.journal.write(label, attempt, new_work=True):
            return stored[-1]
        return queued()

    async def create_chat(
        self,
        user_id: UUID,
        *,
        model: str,
        title: str | None,
        system: str | None,
        params: dict[str, object],
        chat_id: UUID | None = None,
        system_id: UUID | None = None,
        created_at: datetime | None = None,
    ) -> tuple[Chat, list[StoredMessage]]:
        """A new chat, stored now or (the database away) queued: the same values either way."""
        chat_id = chat_id or uuid.uuid4()
        system_id = system_id or uuid.uuid4()
        created_at = created_at or datetime.now(UTC)

        def queued() -> tuple[Chat, list[StoredMessage]]:
            chat = Chat(
                id=chat_id,
                user_id=user_id,
                title=_pg_text(title),
                model=model,
                params=params,
                created_at=created_at,
                updated_at=created_at,
            )
            messages = []
            if system is not None:
                messages.append(_message(system_id, "system", system, [], 0, created_at))
            return chat, messages

        return await self._write_new(
            f"new chat {chat_id} of user {user_id}",
            lambda: Store.create_chat(
                self,
                user_id,
                model=model,
                title=title,
                system=system,
                params=params,
                chat_id=chat_id,
                system_id=system_id,
                created_at=created_at,
            ),
            queued,
        )

    async def begin_turn(
        self,
        chat_id: UUID,
        *,
        user_text: str,
        user_token_ids: list[int],
        assistant_id: UUID,
        prompt_offset: int = 0,
        user_message_id: UUID | None = None,
        created_at: datetime | None = None,
    ) -> StoredMessage:
        """The user's message and the reply's placeholder, stored now or (the database away) queued."""
        user_message_id = user_message_id or uuid.uuid4()
        created_at = created_at or datetime.now(UTC)
        return await self._write_new(
            f"turn of chat {chat_id} (user message {user_message_id}, reply {assistant_id})",
            lambda: Store.begin_turn(
                self,
                chat_id,
                user_text=user_text,
                user_token_ids=user_token_ids,
                assistant_id=assistant_id,
                prompt_offset=prompt_offset,
                user_message_id=user_message_id,
                created_at=created_at,
            ),
            lambda: _message(user_message_id, "user", user_text, user_token_ids, prompt_offset, created_at),
        )

    async def finish_message(self, message_id: UUID, completion: Completion) -> None:
        """The reply's end, stored now or (the database away) queued; never refused for the bound."""

        async def write() -> None:
            await _classified(Store.finish_message(self, message_id, completion))

        label = (
            f"reply {message_id} ({completion.status}, {completion.completion_tokens} tokens, "
            f"{len(completion.text)} characters)"
        )
        await self.journal.write(label, write, new_work=False)

    # ---- reads: refused while writes are pending -----------------------------------------

    async def get_chat(self, user_id: UUID, chat_id: UUID) -> Chat | None:
        return await self._read(lambda: Store.get_chat(self, user_id, chat_id))

    async def list_chats(self, user_id: UUID, *, limit: int, before: UUID | None = None) -> list[ChatSummary]:
        return await self._read(lambda: Store.list_chats(self, user_id, limit=limit, before=before))

    async def messages(
        self, user_id: UUID, chat_id: UUID, *, limit: int | None = None, before: UUID | None = None
    ) -> list[StoredMessage] | None:
        return await self._read(lambda: Store.messages(self, user_id, chat_id, limit=limit, before=before))

    async def reply(self, user_id: UUID, chat_id: UUID, message_id: UUID) -> StoredReply | None:
        return await self._read(lambda: Store.reply(self, user_id, chat_id, message_id))

    async def delete_chat(self, user_id: UUID, chat_id: UUID) -> bool:
        # Behind the gate too: a pending write of the chat must not be replayed after its deletion.
        return await self._read(lambda: Store.delete_chat(self, user_id, chat_id))

    async def user_for_token(self, token: str) -> User | None:
        # Users are never journaled: no gate, but a clear "unavailable" when the database is away.
        return await self._read(lambda: Store.user_for_token(self, token), gated=False)

    async def ping(self, *, within_s: float = 5.0) -> None:
        """Raise unless the database answers and no write is waiting for it."""
        self._check_backlog()
        await self._read(lambda: Store.ping(self, within_s=within_s), gated=False)

    async def close(self, *, grace_s: float = 10.0) -> None:
        """Store the pending writes (for ``flush_timeout_s`` at most, logging each lost one), then close."""
        await self.journal.close(flush_timeout_s=self.flush_timeout_s)
        await super().close(grace_s=grace_s)

    # ---- internals -----------------------------------------------------------------------

    def _check_backlog(self) -> None:
        pending = self.journal.pending
        if pending:
            self.journal.kick()
            reason = self.journal.last_error or "storing them now"
            raise StoreUnavailable(f"{pending} write(s) waiting for the database ({reason})")

    async def _read(self, query: Callable[[], Awaitable[T]], *, gated: bool = True) -> T:
        """Run ``query``; once more on a fresh connection when a pooled one turned out dead."""
        if gated:
            self._check_backlog()
        try:
            return await _classified(query())
        except StoreUnavailable as exc:
            await self._expire_connections()
            if not _dead_connection(exc.__cause__):
                raise
        return await _classified(query())

    async def _expire_connections(self) -> None:
        """Make the pool replace every connection on its next use (they died with the server)."""
        await self._pool.expire_connections()


def _message(
    message_id: UUID, role: str, text: str, token_ids: list[int], prompt_offset: int, created_at: datetime
) -> StoredMessage:
    """A message as it will be stored (for the caller, while the write waits in the journal)."""
    return StoredMessage(
        id=message_id,
        role=role,
        text=text.replace("\x00", "\ufffd"),
        status="complete",
        created_at=created_at,
        token_ids=list(token_ids),
        prompt_offset=prompt_offset,
    )
