"""One open ``chat.v1`` session of a connection: a name for a conversation of the chat core."""

from __future__ import annotations

from dataclasses import dataclass

from service.core.conversation import Conversation
from service.core.reply import Reply, timing_of, usage_of
from service.engine.types import Delta, FinishReason, GenerationResult
from service.protocol import frames
from service.protocol.errors import ErrorCode
from service.store.records import StoredMessage
from service.transports.ws.outbox import Outbox


@dataclass(slots=True)
class Session:
    name: str
    conversation: Conversation
    closing: bool = False


@dataclass(slots=True)
class SessionSink:
    """A reply's frames go to one session of one connection."""

    outbox: Outbox
    session: str

    def delta(self, delta: Delta) -> None:
        self.outbox.put_token(self.session, delta)

    def done(self, reply: Reply, result: GenerationResult) -> None:
        self.outbox.put(done_frame(self.session, reply, result))


def done_frame(session: str, reply: Reply, result: GenerationResult) -> frames.DoneFrame:
    error = None
    if result.reason is FinishReason.ERROR:
        error = frames.ErrorBody(code=ErrorCode.INTERNAL.value, message=result.error or "generation failed")
    return frames.done(
        session=session,
        message=str(reply.message_id),
        reason=result.reason.value,
        usage=usage_of(result),
        timing=timing_of(result),
        error=error,
    )


def message_body(message: StoredMessage) -> frames.MessageBody:
    return frames.MessageBody(
        id=str(message.id),
        role=message.role,  # type: ignore[typeddict-item]
        text=message.text,
        status=message.status,  # type: ignore[typeddict-item]
        created_at=message.created_at.isoformat(),
    )
