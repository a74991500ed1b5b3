"""What the store reads and writes, as plain values: no database library here.

The server imports these (and :func:`parse_id`) without depending on asyncpg.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Final
from uuid import UUID

LOCAL_USER_NAME: Final = "local"
"""The one user of a server that runs without authentication."""

FINISHED_STATUSES: Final = frozenset({"complete", "cancelled", "error"})
"""The statuses a generation can end with (``interrupted`` is only set by the startup sweep)."""

TITLE_MAX_CHARS: Final = 80

_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)


def parse_id(text: str) -> UUID | None:
    """The UUID that a wire id names, or None when it is not a canonical 8-4-4-4-12 hex UUID.

    Only the form the service itself sends is accepted (not braces, ``urn:uuid:`` or bare hex), so
    one chat has one spelling. The caller answers None with ``not_found``.
    """
    if not _CANONICAL_UUID.fullmatch(text):
        return None
    return UUID(text)


def token_hash(token: str) -> bytes:
    """What ``users.token_hash`` holds for an auth token: its SHA-256 (tokens are never stored)."""
    return hashlib.sha256(token.encode()).digest()


def title_from(text: str) -> str | None:
    """A chat title from its first user message: the first non-blank line, at most 80 characters."""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped:
            return stripped[:TITLE_MAX_CHARS]
    return None


@dataclass(frozen=True, slots=True)
class User:
    id: UUID
    name: str


@dataclass(frozen=True, slots=True)
class UserRecord:
    """One row of ``users list``: a user's account, never its token."""

    id: UUID
    name: str
    created_at: datetime
    revoked_at: datetime | None
    has_token: bool  # False for the local user of --auth none (and a user never given a token)


@dataclass(frozen=True, slots=True)
class Chat:
    id: UUID
    user_id: UUID
    title: str | None
    model: str
    params: dict[str, object]
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class ChatSummary:
    """One row of the chat list; ``messages`` counts the stored messages, not a generation in flight."""

    id: UUID
    title: str | None
    model: str
    updated_at: datetime
    messages: int


@dataclass(frozen=True, slots=True)
class StoredMessage:
    id: UUID
    role: str  # system | user | assistant
    text: str
    status: str  # complete | cancelled | error | interrupted (generating rows are never returned)
    created_at: datetime
    token_ids: list[int]
    prompt_offset: int = 0  # user messages: where token_ids start in the chat's ids (see begin_turn)


@dataclass(frozen=True, slots=True)
class Completion:
    """How a generation ended: what :meth:`Store.finish_message` writes into the assistant row."""

    text: str
    token_ids: list[int]
    status: str  # complete | cancelled | error
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    queued_ms: float
    ttft_ms: float | None  # None when no token came out
    total_ms: float
    tokens_per_s: float
    error: str | None = None
    # How it streamed (see sql/0003_reply_deltas.sql): per delta, the tokens it covered and the
    # characters it carried; and the engine's finish reason. None where unknown.
    delta_tokens: list[int] | None = None
    delta_chars: list[int] | None = None
    reason: str | None = None  # stop | length | cancelled | error


@dataclass(frozen=True, slots=True)
class StoredReply:
    """An assistant message as the REST chat API replays it: its stored end and how it streamed.

    ``status`` may be ``generating``: the reply runs (on this instance or another) or its instance
    died and no sweeper has marked it ``interrupted`` yet.
    """

    id: UUID
    chat_id: UUID
    status: str  # generating | complete | cancelled | error | interrupted
    text: str
    token_ids: list[int]
    delta_tokens: list[int] | None
    delta_chars: list[int] | None
    reason: str | None
    prompt_tokens: int | None
    cached_tokens: int | None
    queued_ms: float | None
    ttft_ms: float | None
    total_ms: float | None
    tokens_per_s: float | None
    error: str | None
