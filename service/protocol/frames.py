"""The frames of ``chat.v1``: client frames as parsed dataclasses, server frames as TypedDicts.

Client frames are what :func:`service.protocol.codec.parse_client_frame` returns, already
checked for types; server frames are built by the functions below, which are the only
place their field names are spelled. The contract is ``docs/protocol.md``; the JSON
Schemas in ``schema/`` describe the same frames.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, NotRequired, TypedDict, TypeVar, cast

from service.protocol.errors import ErrorCode, FrameId

PROTOCOL = "chat.v1"
# params.max_tokens when neither `send` nor `open` gives it (docs/protocol.md).
DEFAULT_MAX_TOKENS = 256

# ---- client -> server ---------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Params:
    """Sampling settings as the client sent them; ``None`` = not given (inherit)."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] | None = None

    def over(self, base: Params) -> Params:
        """These params with the fields not given here taken from ``base``."""
        merged = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in merged.items():
            if value is None:
                merged[name] = getattr(base, name)
        return Params(**merged)

    def given(self) -> dict[str, Any]:
        """The fields that were set, as JSON-ready values."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True, slots=True)
class Resume:
    message: str  # id of the assistant message being generated
    index: int  # the first token index the client still needs


@dataclass(frozen=True, slots=True)
class Hello:
    id: FrameId | None
    token: str | None
    client: object


@dataclass(frozen=True, slots=True)
class Open:
    id: FrameId | None
    session: str
    chat: str | None
    model: str | None
    system: str | None
    title: str | None
    params: Params
    resume: Resume | None


@dataclass(frozen=True, slots=True)
class Send:
    id: FrameId | None
    session: str
    text: str
    params: Params


@dataclass(frozen=True, slots=True)
class Stop:
    id: FrameId | None
    session: str


@dataclass(frozen=True, slots=True)
class Close:
    id: FrameId | None
    session: str


@dataclass(frozen=True, slots=True)
class ListModels:
    id: FrameId | None


@dataclass(frozen=True, slots=True)
class ListChats:
    id: FrameId | None
    limit: int
    before: str | None


@dataclass(frozen=True, slots=True)
class GetHistory:
    id: FrameId | None
    chat: str
    limit: int | None
    before: str | None


@dataclass(frozen=True, slots=True)
class Delete:
    id: FrameId | None
    chat: str


@dataclass(frozen=True, slots=True)
class Ping:
    id: FrameId | None


ClientFrame = Hello | Open | Send | Stop | Close | ListModels | ListChats | GetHistory | Delete | Ping

# ---- server -> client ---------------------------------------------------------------

MessageRole = Literal["system", "user", "assistant"]
MessageStatus = Literal["complete", "cancelled", "error", "interrupted"]
DoneReason = Literal["stop", "length", "cancelled", "error"]


class MessageBody(TypedDict):
    id: str
    role: MessageRole
    text: str
    status: MessageStatus
    created_at: str


class UserBody(TypedDict):
    id: str
    name: str


class ModelBody(TypedDict):
    id: str
    context_length: int
    loaded: bool
    default: bool
    # False for a base (completion) model without a chat template: its chats are a plain
    # "User:/Assistant:" transcript. Absent (older servers): a chat model.
    chat: NotRequired[bool]


class ChatSummaryBody(TypedDict):
    chat: str
    title: str | None
    model: str
    updated_at: str
    messages: int


class Usage(TypedDict):
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


class Timing(TypedDict):
    queued_ms: float
    ttft_ms: float | None
    total_ms: float
    tokens_per_s: float


class ErrorBody(TypedDict):
    code: str
    message: str


class Limits(TypedDict):
    max_frame_bytes: int
    max_sessions: int
    max_tokens: int
    hello_timeout_s: float


class WelcomeFrame(TypedDict):
    type: Literal["welcome"]
    protocol: str
    server: str
    user: UserBody
    models: list[ModelBody]
    limits: Limits
    id: NotRequired[FrameId]


class OpenedFrame(TypedDict):
    type: Literal["opened"]
    session: str
    chat: str
    model: str
    messages: list[MessageBody]
    id: NotRequired[FrameId]


class StartedFrame(TypedDict):
    type: Literal["started"]
    session: str
    message: str
    prompt_tokens: int
    cached_tokens: int
    queue_position: int
    id: NotRequired[FrameId]


class TokenFrame(TypedDict):
    type: Literal["token"]
    session: str
    index: int
    text: str
    tokens: NotRequired[int]


class DoneFrame(TypedDict):
    type: Literal["done"]
    session: str
    message: str
    reason: DoneReason
    usage: Usage
    timing: Timing
    error: NotRequired[ErrorBody]


class ClosedFrame(TypedDict):
    type: Literal["closed"]
    session: str
    id: NotRequired[FrameId]


class ChatsFrame(TypedDict):
    type: Literal["chats"]
    chats: list[ChatSummaryBody]
    id: NotRequired[FrameId]


class HistoryFrame(TypedDict):
    type: Literal["history"]
    chat: str
    messages: list[MessageBody]
    id: NotRequired[FrameId]


class DeletedFrame(TypedDict):
    type: Literal["deleted"]
    chat: str
    id: NotRequired[FrameId]


class ModelsFrame(TypedDict):
    type: Literal["models"]
    models: list[ModelBody]
    id: NotRequired[FrameId]


class PongFrame(TypedDict):
    type: Literal["pong"]
    id: NotRequired[FrameId]


class ErrorFrame(TypedDict):
    type: Literal["error"]
    code: str
    message: str
    session: NotRequired[str]
    id: NotRequired[FrameId]


ServerFrame = (
    WelcomeFrame
    | OpenedFrame
    | StartedFrame
    | TokenFrame
    | DoneFrame
    | ClosedFrame
    | ChatsFrame
    | HistoryFrame
    | DeletedFrame
    | ModelsFrame
    | PongFrame
    | ErrorFrame
)


_F = TypeVar("_F", bound=Mapping[str, object])


def _echo(frame: _F, id: FrameId | None) -> _F:
    """Echo the client frame's ``id`` on its direct reply."""
    if id is not None:
        cast(dict[str, object], frame)["id"] = id
    return frame


def welcome(
    id: FrameId | None, *, server: str, user: UserBody, models: list[ModelBody], limits: Limits
) -> WelcomeFrame:
    return _echo(
        WelcomeFrame(
            type="welcome", protocol=PROTOCOL, server=server, user=user, models=models, limits=limits
        ),
        id,
    )


def opened(
    id: FrameId | None, *, session: str, chat: str, model: str, messages: list[MessageBody]
) -> OpenedFrame:
    return _echo(OpenedFrame(type="opened", session=session, chat=chat, model=model, messages=messages), id)


def started(
    id: FrameId | None,
    *,
    session: str,
    message: str,
    prompt_tokens: int,
    cached_tokens: int,
    queue_position: int,
) -> StartedFrame:
    return _echo(
        StartedFrame(
            type="started",
            session=session,
            message=message,
            prompt_tokens=prompt_tokens,
            cached_tokens=cached_tokens,
            queue_position=queue_position,
        ),
        id,
    )


def token(session: str, index: int, text: str, tokens: int = 1) -> TokenFrame:
    frame = TokenFrame(type="token", session=session, index=index, text=text)
    if tokens != 1:
        frame["tokens"] = tokens
    return frame


def done(
    *,
    session: str,
    message: str,
    reason: DoneReason,
    usage: Usage,
    timing: Timing,
    error: ErrorBody | None = None,
) -> DoneFrame:
    frame = DoneFrame(
        type="done", session=session, message=message, reason=reason, usage=usage, timing=timing
    )
    if error is not None:
        frame["error"] = error
    return frame


def closed(id: FrameId | None, *, session: str) -> ClosedFrame:
    return _echo(ClosedFrame(type="closed", session=session), id)


def chats(id: FrameId | None, *, chats: list[ChatSummaryBody]) -> ChatsFrame:
    return _echo(ChatsFrame(type="chats", chats=chats), id)


def history(id: FrameId | None, *, chat: str, messages: list[MessageBody]) -> HistoryFrame:
    return _echo(HistoryFrame(type="history", chat=chat, messages=messages), id)


def deleted(id: FrameId | None, *, chat: str) -> DeletedFrame:
    return _echo(DeletedFrame(type="deleted", chat=chat), id)


def models(id: FrameId | None, *, models: list[ModelBody]) -> ModelsFrame:
    return _echo(ModelsFrame(type="models", models=models), id)


def pong(id: FrameId | None) -> PongFrame:
    return _echo(PongFrame(type="pong"), id)


def error(
    code: ErrorCode, message: str, *, id: FrameId | None = None, session: str | None = None
) -> ErrorFrame:
    frame = ErrorFrame(type="error", code=code.value, message=message)
    if session is not None:
        frame["session"] = session
    return _echo(frame, id)
