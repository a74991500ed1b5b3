"""The chat history in PostgreSQL: the only package that talks to the database (asyncpg).

``Store`` runs the queries over a pool and applies ``sql/`` migrations when opened;
``records`` holds the plain values it returns; ``EmbeddedPostgres`` (``service.store.embedded``)
runs a private PostgreSQL server when no database URL is configured.
"""

from __future__ import annotations

from service.store.records import (
    Chat,
    ChatSummary,
    Completion,
    StoredMessage,
    User,
    parse_id,
)
from service.store.store import Store

__all__ = ["Chat", "ChatSummary", "Completion", "Store", "StoredMessage", "User", "parse_id"]
