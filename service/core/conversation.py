"""One chat as the model sees it: its template messages and the ids consumed so far.

``token_ids`` are the ids the model has consumed for this chat (every prompt segment and
every generated id, exactly as fed and produced); the next turn's prompt keeps them as its
prefix, so the engine can serve them from the chat's KV cache and a chat re-prefilled from
the database sees exactly what a cached one would.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from uuid import UUID

from service.core.reply import Reply
from service.engine.engine import Engine
from service.engine.tokenizer import ChatMessage
from service.engine.types import ChatKey
from service.protocol import frames
from service.store.records import StoredMessage


def chat_key(user_id: UUID, chat_id: UUID | str) -> ChatKey:
    """KV caches are keyed ``<owner>/<conversation>``: the engine reuses a cache only
    between keys of one owner, so no user is ever served another's cache."""
    return ChatKey(f"{user_id}/{chat_id}")


@dataclass(slots=True)
class Conversation:
    chat_id: UUID
    user_id: UUID
    model_id: str
    engine: Engine
    params: frames.Params  # the chat's own, under the frame's
    messages: list[ChatMessage] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    reply: Reply | None = None

    @property
    def key(self) -> ChatKey:
        return chat_key(self.user_id, self.chat_id)

    @property
    def generating(self) -> bool:
        return self.reply is not None and not self.reply.done.is_set()

    def fold_finished(self) -> None:
        """Make a finished reply part of the conversation (once)."""
        reply = self.reply
        if reply is None or not reply.done.is_set() or reply.result is None:
            return
        self.messages = [*self.messages, ChatMessage(role="assistant", content=reply.result.text)]
        self.token_ids = [*reply.prompt_ids, *reply.result.token_ids]
        self.reply = None


def replayed(stored: Sequence[StoredMessage]) -> tuple[list[ChatMessage], list[int]]:
    """The template messages and consumed ids of a stored chat (see the module docstring)."""
    messages = [ChatMessage(role=m.role, content=m.text) for m in stored]
    ids: list[int] = []
    for m in stored:
        if m.role == "user":
            ids = ids[: m.prompt_offset] + list(m.token_ids)
        elif m.role == "assistant":
            ids += m.token_ids
    return messages, ids
