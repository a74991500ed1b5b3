"""The chat history in PostgreSQL, behind one asyncpg pool.

Every method that reads a chat for a user takes that user's id and treats a chat of someone else
exactly like a missing one (None, False, []), so callers cannot leak that it exists.

Database failures surface as :class:`~service.errors.StoreError`; asyncpg's exceptions are caught
by their SQLSTATE classes, never by message text. PostgreSQL ``text`` cannot hold U+0000, so NUL
characters in written text are stored as U+FFFD rather than failing the write.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Collection
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Self, overload
from urllib.parse import urlsplit, urlunsplit
from uuid import UUID

import asyncpg
import orjson

from service.errors import ChatGone, StoreError, UserExists
from service.store.migrations import apply_migrations, load_migrations
from service.store.records import (
    FINISHED_STATUSES,
    LOCAL_USER_NAME,
    Chat,
    ChatSummary,
    Completion,
    StoredMessage,
    StoredReply,
    User,
    UserRecord,
    title_from,
    token_hash,
)

log = logging.getLogger(__name__)

# What a lost server, a refused login or a failed statement raise through asyncpg (TimeoutError
# is an OSError).
_DATABASE_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)

# ``users revoke`` runs in another process than the server: it tells the server through this channel.
REVOKED_CHANNEL = "localchat_user_revoked"

_MESSAGE_COLUMNS = "id, role, text, status, created_at, token_ids, prompt_offset"
_CHAT_COLUMNS = "id, user_id, title, model, params, created_at, updated_at"


class Store:
    """The history store. Make one with :meth:`open`; :meth:`close` it at shutdown."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        # The instance (service.store.leases) that owns the replies this store begins; None: no
        # owner, so any replica's sweeper treats them as orphaned.
        self.owner: UUID | None = None

    @classmethod
    async def open(
        cls, dsn: str, *, min_size: int = 1, max_size: int = 10, connect_timeout: float = 10.0
    ) -> Self:
        """Connect a pool to ``dsn`` (a ``postgresql://`` URI) and bring the schema up to date."""
        try:
            pool = await asyncpg.create_pool(
                dsn, min_size=min_size, max_size=max_size, timeout=connect_timeout, init=_init_connection
            )
        except (*_DATABASE_ERRORS, ValueError) as exc:
            raise StoreError(f"cannot connect to the database at {redact(dsn)}: {exc}") from exc
        try:
            async with pool.acquire() as conn:
                applied = await apply_migrations(conn, load_migrations())
        except BaseException as exc:
            pool.terminate()
            if isinstance(exc, _DATABASE_ERRORS):
                raise StoreError(f"cannot migrate the database at {redact(dsn)}: {exc}") from exc
            raise
        if applied:
            log.info("database schema migrated: %s", ", ".join(m.name for m in applied))
        return cls(pool)

    async def close(self, *, grace_s: float = 10.0) -> None:
        """Close the pool, waiting up to ``grace_s`` for queries in flight, then cutting them off."""
        try:
            await asyncio.wait_for(self._pool.close(), grace_s)
        except TimeoutError:
            log.warning("database pool did not close within %.1f s; terminating it", grace_s)
            self._pool.terminate()

    @property
    def pending_writes(self) -> int:
        """Writes accepted but not yet in the database: none, every write here is awaited.

        (:class:`~service.store.durable.DurableStore` keeps writes in memory while the database is down.)
        """
        return 0

    async def ping(self, *, within_s: float = 5.0) -> None:
        """Raise :class:`StoreError` unless the database answers a query within ``within_s``."""
        try:
            async with asyncio.timeout(within_s):
                await self._pool.fetchval("SELECT 1")
        except _DATABASE_ERRORS as exc:
            raise StoreError(f"database unreachable: {exc!r}") from exc

    async def local_user(self) -> User:
        """The user named ``local``, who owns every chat when authentication is off."""
        return await self.ensure_user(LOCAL_USER_NAME)

    async def ensure_user(self, name: str) -> User:
        """The user called ``name``, created on first use (safe when several callers race)."""
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "INSERT INTO users (name) VALUES ($1) ON CONFLICT (name) DO NOTHING RETURNING id, name", name
            )
            if row is None:  # it existed, or a concurrent insert won (and has committed by now)
                row = await conn.fetchrow("SELECT id, name FROM users WHERE name = $1", name)
        if row is None:
            raise StoreError(f"user {name!r} vanished while being created")
        return User(id=row["id"], name=row["name"])

    async def user_for_token(self, token: str) -> User | None:
        """The user holding auth ``token`` (matched by its SHA-256), or None: unknown or revoked.

        The local user (of ``--auth none``) never matches, whatever its row holds.
        """
        digest = token_hash(token)
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "SELECT id, name, token_hash FROM users"
                " WHERE token_hash = $1 AND revoked_at IS NULL AND name <> $2",
                digest,
                LOCAL_USER_NAME,
            )
        if row is None or not hmac.compare_digest(bytes(row["token_hash"]), digest):
            return None
        return User(id=row["id"], name=row["name"])

    async def add_user(self, name: str, token_hash: bytes) -> User:
        """Give ``name`` the token whose SHA-256 is ``token_hash``, creating the user if needed.

        A revoked user (or one that never had a token) comes back under the new token, with the
        same id and so the same chats. Raises :class:`UserExists` when ``name`` holds a live token.
        """
        async with self._connection() as conn:
            row = await conn.fetchrow(
                """
                INSERT INTO users (name, token_hash) VALUES ($1, $2)
                ON CONFLICT (name) DO UPDATE SET token_hash = excluded.token_hash, revoked_at = NULL
                WHERE users.revoked_at IS NOT NULL OR users.token_hash IS NULL
                RETURNING id, name
                """,
                name,
                token_hash,
            )
        if row is None:
            raise UserExists(f"user {name!r} exists and holds a token; revoke it first to issue a new one")
        return User(id=row["id"], name=row["name"])

    async def list_users(self) -> list[UserRecord]:
        """Every user, oldest first (tokens are never stored, so never listed)."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT id, name, created_at, revoked_at, token_hash IS NOT NULL AS has_token"
                " FROM users ORDER BY created_at, name"
            )
        return [
            UserRecord(
                id=r["id"],
                name=r["name"],
                created_at=r["created_at"],
                revoked_at=r["revoked_at"],
                has_token=r["has_token"],
            )
            for r in rows
        ]

    async def revoke_user(self, name: str) -> bool:
        """Mark ``name`` revoked: its token stops working, and a server listening on
        :data:`REVOKED_CHANNEL` hears the user's id when the revocation commits.
        False when no such user is live."""
        async with self._connection() as conn, conn.transaction():
            revoked = await conn.fetchval(
                "UPDATE users SET revoked_at = now() WHERE name = $1 AND revoked_at IS NULL RETURNING id",
                name,
            )
            if revoked is not None:
                await conn.execute("SELECT pg_notify($1, $2)", REVOKED_CHANNEL, str(revoked))
        return revoked is not None

    async def revoked_among(self, user_ids: Collection[UUID]) -> set[UUID]:
        """Those of ``user_ids`` that are revoked now."""
        if not user_ids:
            return set()
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT id FROM users WHERE id = ANY($1::uuid[]) AND revoked_at IS NOT NULL", list(user_ids)
            )
        return {row["id"] for row in rows}

    @asynccontextmanager
    async def listen(self, channel: str, on_payload: Callable[[str], None]) -> AsyncIterator[asyncio.Event]:
        """Hand every notification on ``channel`` to ``on_payload`` until the block ends.

        Yields an event that is set when the listening connection is lost (the database went
        away): notifications sent meanwhile are not heard, so a caller listens again and
        re-reads what it depends on.
        """
        lost = asyncio.Event()

        def notified(_conn: object, _pid: int, _channel: str, payload: str) -> None:
            on_payload(payload)

        def terminated(_conn: object) -> None:
            lost.set()

        try:
            conn = await self._pool.acquire()
        except _DATABASE_ERRORS as exc:
            raise StoreError(f"database error: {exc!r}") from exc
        conn.add_termination_listener(terminated)
        try:
            await conn.add_listener(channel, notified)
            yield lost
        except _DATABASE_ERRORS as exc:
            raise StoreError(f"database error: {exc!r}") from exc
        finally:
            # Both listeners go before the connection returns to the pool (asyncpg warns about a
            # notification listener left on, and keeps termination listeners across a reset); a
            # lost connection has dropped them already, and its proxy refuses every call.
            with contextlib.suppress(*_DATABASE_ERRORS):
                conn.remove_termination_listener(terminated)
                await conn.remove_listener(channel, notified)
            with contextlib.suppress(*_DATABASE_ERRORS):
                await self._pool.release(conn)

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
        """A new chat; a ``system`` prompt, when given, is stored as its first message.

        The ids and the creation time may be made up front (so that the write can be replayed when
        its answer was lost): creating a chat that is stored already returns it as it is.
        """
        chat_id = chat_id or uuid.uuid4()
        async with self._connection() as conn, conn.transaction():
            row = await conn.fetchrow(
                "INSERT INTO chats (id, user_id, title, model, params, created_at, updated_at)"
                " VALUES ($1, $2, $3, $4, $5, coalesce($6, now()), coalesce($6, now()))"
                f" ON CONFLICT (id) DO NOTHING RETURNING {_CHAT_COLUMNS}",
                chat_id,
                user_id,
                _pg_text(title),
                model,
                params,
                created_at,
            )
            if row is None:  # stored already (a replay)
                row = await conn.fetchrow(
                    f"SELECT {_CHAT_COLUMNS} FROM chats WHERE id = $1 AND user_id = $2", chat_id, user_id
                )
                if row is None:
                    raise StoreError(f"chat id {chat_id} is taken")
                system_rows = await conn.fetch(
                    f"SELECT {_MESSAGE_COLUMNS} FROM messages"
                    " WHERE chat_id = $1 AND role = 'system' ORDER BY seq",
                    chat_id,
                )
                return _chat(row), [_message(r) for r in system_rows]
            messages: list[StoredMessage] = []
            if system is not None:
                system_row = await conn.fetchrow(
                    "INSERT INTO messages (id, chat_id, role, text, status, created_at, finished_at) "
                    "VALUES ($1, $2, 'system', $3, 'complete', coalesce($4, now()), coalesce($4, now())) "
                    f"RETURNING {_MESSAGE_COLUMNS}",
                    system_id or uuid.uuid4(),
                    chat_id,
                    _pg_text(system),
                    created_at,
                )
                messages.append(_message(system_row))
        return _chat(row), messages

    async def get_chat(self, user_id: UUID, chat_id: UUID) -> Chat | None:
        """The chat, or None when it does not exist or belongs to another user."""
        async with self._connection() as conn:
            row = await conn.fetchrow(
                f"SELECT {_CHAT_COLUMNS} FROM chats WHERE id = $1 AND user_id = $2", chat_id, user_id
            )
        return None if row is None else _chat(row)

    async def list_chats(self, user_id: UUID, *, limit: int, before: UUID | None = None) -> list[ChatSummary]:
        """The user's chats, most recently updated first, at most ``limit``.

        ``before`` (a chat id, the last one of the previous page) continues the list after that chat;
        a chat id that is not the user's gives an empty page.
        """
        if limit <= 0:
            return []
        async with self._connection() as conn:
            rows = await conn.fetch(
                """
                SELECT c.id, c.title, c.model, c.updated_at,
                       (SELECT count(*) FROM messages m
                        WHERE m.chat_id = c.id AND m.status <> 'generating') AS messages
                FROM chats c
                WHERE c.user_id = $1
                  AND ($2::uuid IS NULL
                       OR (c.updated_at, c.id) < (SELECT b.updated_at, b.id FROM chats b
                                                  WHERE b.id = $2 AND b.user_id = $1))
                ORDER BY c.updated_at DESC, c.id DESC
                LIMIT $3
                """,
                user_id,
                before,
                limit,
            )
        return [
            ChatSummary(
                id=r["id"],
                title=r["title"],
                model=r["model"],
                updated_at=r["updated_at"],
                messages=r["messages"],
            )
            for r in rows
        ]

    async def messages(
        self, user_id: UUID, chat_id: UUID, *, limit: int | None = None, before: UUID | None = None
    ) -> list[StoredMessage] | None:
        """The chat's stored messages oldest first, or None when the chat is not the user's.

        A generation still running is not part of the history. With ``limit``, the newest ``limit``
        messages (older than the message ``before``, when given), still oldest first.
        """
        if limit is not None and limit <= 0:
            limit = 0
        async with self._connection() as conn:
            owned = await conn.fetchval(
                "SELECT true FROM chats WHERE id = $1 AND user_id = $2", chat_id, user_id
            )
            if owned is None:
                return None
            rows = await conn.fetch(
                f"""
                SELECT {_MESSAGE_COLUMNS} FROM (
                    SELECT {_MESSAGE_COLUMNS}, seq FROM messages
                    WHERE chat_id = $1 AND status <> 'generating'
                      AND ($2::uuid IS NULL
                           OR seq < (SELECT b.seq FROM messages b WHERE b.id = $2 AND b.chat_id = $1))
                    ORDER BY seq DESC
                    LIMIT $3
                ) newest
                ORDER BY seq
                """,
                chat_id,
                before,
                limit,
            )
        return [_message(r) for r in rows]

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
        """Store the user's message and open the assistant's (``generating``), in one transaction.

        ``user_token_ids`` are the prompt's ids from ``prompt_offset`` on: rebuilding a chat's ids
        from its history keeps the first ``prompt_offset`` ids before each user message's own.
        Also marks the chat updated and, while it has no title, titles it from ``user_text``.
        The caller has already checked that the chat is the user's. The user message's id and the
        creation time may be made up front (so that the write can be replayed when its answer was
        lost): a turn whose user message is stored already is left as it is and returned.
        """
        user_message_id = user_message_id or uuid.uuid4()
        async with self._connection() as conn, conn.transaction():
            # The chat row first: a concurrent delete then waits for this turn (or this turn for
            # it) instead of the two taking row locks in opposite orders (a deadlock).
            await conn.execute("SELECT 1 FROM chats WHERE id = $1 FOR NO KEY UPDATE", chat_id)
            try:
                row = await conn.fetchrow(
                    "INSERT INTO messages"
                    " (id, chat_id, role, text, status, token_ids, prompt_offset, created_at, finished_at)"
                    " VALUES ($1, $2, 'user', $3, 'complete', $4, $5,"
                    " coalesce($6, now()), coalesce($6, now()))"
                    f" ON CONFLICT (id) DO NOTHING RETURNING {_MESSAGE_COLUMNS}",
                    user_message_id,
                    chat_id,
                    _pg_text(user_text),
                    user_token_ids,
                    prompt_offset,
                    created_at,
                )
            except asyncpg.ForeignKeyViolationError as exc:
                raise ChatGone(f"chat {chat_id} does not exist (deleted meanwhile?)") from exc
            if row is None:  # stored already (a replay)
                row = await conn.fetchrow(
                    f"SELECT {_MESSAGE_COLUMNS} FROM messages WHERE id = $1 AND chat_id = $2",
                    user_message_id,
                    chat_id,
                )
                if row is None:
                    raise StoreError(f"message id {user_message_id} is taken")
                return _message(row)
            await conn.execute(
                "INSERT INTO messages (id, chat_id, role, text, status, owner, created_at) "
                "VALUES ($1, $2, 'assistant', '', 'generating', $3, coalesce($4, now()))",
                assistant_id,
                chat_id,
                self.owner,
                created_at,
            )
            await conn.execute(
                "UPDATE chats SET updated_at = now(), title = coalesce(title, $2) WHERE id = $1",
                chat_id,
                title_from(_pg_text(user_text)),
            )
        return _message(row)

    async def finish_message(self, message_id: UUID, completion: Completion) -> None:
        """Write how the assistant message ended, and mark its chat updated.

        Writing the same completion twice leaves the same row; a message whose chat was deleted
        meanwhile is silently gone. The write wins over a sweeper's ``interrupted`` (the owner's
        lease expired while the database was away, service.store.leases): more data wins.
        """
        if completion.status not in FINISHED_STATUSES:
            raise ValueError(f"a generation cannot end with status {completion.status!r}")
        async with self._connection() as conn, conn.transaction():
            # The chat row first, as begin_turn and a cascading delete take it (no deadlock).
            await conn.execute(
                "SELECT 1 FROM chats WHERE id = (SELECT chat_id FROM messages WHERE id = $1)"
                " FOR NO KEY UPDATE",
                message_id,
            )
            await conn.execute(
                """
                WITH finished AS (
                    UPDATE messages
                    SET text = $2, token_ids = $3, status = $4,
                        prompt_tokens = $5, cached_tokens = $6, completion_tokens = $7,
                        queued_ms = $8, ttft_ms = $9, total_ms = $10, tokens_per_s = $11,
                        error = $12, delta_tokens = $13, delta_chars = $14, finish_reason = $15,
                        finished_at = now()
                    WHERE id = $1 AND role = 'assistant'
                    RETURNING chat_id
                )
                UPDATE chats SET updated_at = now() FROM finished WHERE chats.id = finished.chat_id
                """,
                message_id,
                _pg_text(completion.text),
                completion.token_ids,
                completion.status,
                completion.prompt_tokens,
                completion.cached_tokens,
                completion.completion_tokens,
                completion.queued_ms,
                completion.ttft_ms,
                completion.total_ms,
                completion.tokens_per_s,
                _pg_text(completion.error),
                completion.delta_tokens,
                completion.delta_chars,
                completion.reason,
            )

    async def reply(self, user_id: UUID, chat_id: UUID, message_id: UUID) -> StoredReply | None:
        """The assistant message ``message_id`` of the user's chat, in any status (``generating``
        included); None when there is no such reply in a chat of this user's."""
        async with self._connection() as conn:
            row = await conn.fetchrow(
                """
                SELECT m.id, m.chat_id, m.status, m.text, m.token_ids, m.delta_tokens, m.delta_chars,
                       m.finish_reason, m.prompt_tokens, m.cached_tokens, m.queued_ms, m.ttft_ms,
                       m.total_ms, m.tokens_per_s, m.error
                FROM messages m JOIN chats c ON c.id = m.chat_id
                WHERE m.id = $1 AND m.chat_id = $2 AND c.user_id = $3 AND m.role = 'assistant'
                """,
                message_id,
                chat_id,
                user_id,
            )
        if row is None:
            return None
        return StoredReply(
            id=row["id"],
            chat_id=row["chat_id"],
            status=row["status"],
            text=row["text"],
            token_ids=list(row["token_ids"]),
            delta_tokens=None if row["delta_tokens"] is None else list(row["delta_tokens"]),
            delta_chars=None if row["delta_chars"] is None else list(row["delta_chars"]),
            reason=row["finish_reason"],
            prompt_tokens=row["prompt_tokens"],
            cached_tokens=row["cached_tokens"],
            queued_ms=row["queued_ms"],
            ttft_ms=row["ttft_ms"],
            total_ms=row["total_ms"],
            tokens_per_s=row["tokens_per_s"],
            error=row["error"],
        )

    async def delete_chat(self, user_id: UUID, chat_id: UUID) -> bool:
        """Delete the chat and its messages; False when it is not the user's (or does not exist)."""
        async with self._connection() as conn:
            deleted = await conn.fetchval(
                "DELETE FROM chats WHERE id = $1 AND user_id = $2 RETURNING id", chat_id, user_id
            )
        return deleted is not None

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection; database failures inside the block become :class:`StoreError`."""
        try:
            async with self._pool.acquire() as conn:
                yield conn
        except _DATABASE_ERRORS as exc:
            raise StoreError(f"database error: {exc!r}") from exc


async def _init_connection(conn: asyncpg.Connection) -> None:
    """Per pooled connection: jsonb values in and out as Python objects (orjson)."""
    await conn.set_type_codec("jsonb", schema="pg_catalog", encoder=_dump_json, decoder=orjson.loads)


def _dump_json(value: object) -> str:
    return orjson.dumps(value).decode()


@overload
def _pg_text(text: str) -> str: ...
@overload
def _pg_text(text: None) -> None: ...
def _pg_text(text: str | None) -> str | None:
    """``text`` as PostgreSQL can store it: U+0000 becomes U+FFFD."""
    return None if text is None else text.replace("\x00", "\ufffd")


def redact(dsn: str) -> str:
    """``dsn`` with its password masked, for messages and logs."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostport}"))


def _chat(row: asyncpg.Record) -> Chat:
    return Chat(
        id=row["id"],
        user_id=row["user_id"],
        title=row["title"],
        model=row["model"],
        params=row["params"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _message(row: asyncpg.Record) -> StoredMessage:
    return StoredMessage(
        id=row["id"],
        role=row["role"],
        text=row["text"],
        status=row["status"],
        created_at=row["created_at"],
        token_ids=list(row["token_ids"]),
        prompt_offset=row["prompt_offset"],
    )
