"""One open chat session of a connection: the conversation the model sees, and its ids.

``token_ids`` are the ids the model has consumed for this chat so far (every prompt
segment and every generated id, exactly as fed and produced); the next turn's prompt
keeps them as its prefix, so the engine can serve them from the chat's KV cache and a
chat re-prefilled from the database sees exactly what a cached one would.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from uuid import UUID

from service.engine.engine import Engine
from service.engine.tokenizer import ChatMessage
from service.engine.types import ChatKey
from service.generation import Generation
from service.protocol import frames
from service.store.records import StoredMessage


def chat_key(user_id: UUID, chat_id: UUID) -> ChatKey:
    """KV caches are keyed by owner and chat: no conversation is served another's cache."""
    return ChatKey(f"{user_id}/{chat_id}")


@dataclass(slots=True)
class Session:
    name: str
    chat_id: UUID
    user_id: UUID
    model_id: str
    engine: Engine
    params: frames.Params
    messages: list[ChatMessage] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    generation: Generation | None = None
    closing: bool = False

    @property
    def key(self) -> ChatKey:
        return chat_key(self.user_id, self.chat_id)

    def fold_finished(self) -> None:
        """Make a finished reply part of the conversation (once), and free the session."""
        generation = self.generation
        if generation is None or not generation.done.is_set() or generation.result is None:
            return
        self.messages = [*self.messages, ChatMessage(role="assistant", content=generation.result.text)]
        self.token_ids = [*generation.prompt_ids, *generation.result.token_ids]
        self.generation = None

    @property
    def generating(self) -> bool:
        return self.generation is not None and not self.generation.done.is_set()


def conversation(stored: Sequence[StoredMessage]) -> tuple[list[ChatMessage], list[int]]:
    """The template messages and consumed ids of a stored chat (see the module docstring)."""
    messages = [ChatMessage(role=m.role, content=m.text) for m in stored]
    ids: list[int] = []
    for m in stored:
        if m.role == "user":
            ids = ids[: m.prompt_offset] + list(m.token_ids)
        elif m.role == "assistant":
            ids += m.token_ids
    return messages, ids


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def message_body(message: StoredMessage) -> frames.MessageBody:
    return frames.MessageBody(
        id=str(message.id),
        role=message.role,  # type: ignore[typeddict-item]
        text=message.text,
        status=message.status,  # type: ignore[typeddict-item]
        created_at=message.created_at.isoformat(),
    )
