"""One open ``chat.v1`` session of a connection: a name for a conversation of the chat core."""

from __future__ import annotations

from dataclasses import dataclass

from service.core.conversation import Conversation
from service.core.reply import Reply
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


def message_body(message: StoredMessage) -> frames.MessageBody:
    return frames.MessageBody(
        id=str(message.id),
        role=message.role,  # type: ignore[typeddict-item]
        text=message.text,
        status=message.status,  # type: ignore[typeddict-item]
        created_at=message.created_at.isoformat(),
    )
