"""Error codes and close codes of ``chat.v1``, and the one exception the protocol raises.

``ProtocolError`` carries everything the server needs to answer: the ``error`` frame's
``code`` and ``message``, the client frame's ``id`` and ``session`` when they could be read,
and, for the few violations that end the connection, the close code.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class ErrorCode(StrEnum):
    BAD_FRAME = "bad_frame"
    UNKNOWN_TYPE = "unknown_type"
    UNAUTHENTICATED = "unauthenticated"
    UNKNOWN_SESSION = "unknown_session"
    SESSION_EXISTS = "session_exists"
    BUSY = "busy"
    BAD_PARAMS = "bad_params"
    NOT_FOUND = "not_found"
    LIMIT = "limit"
    OVERLOADED = "overloaded"
    MODEL_UNAVAILABLE = "model_unavailable"
    INTERNAL = "internal"


class CloseCode(IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    UNSUPPORTED_DATA = 1003  # a binary frame
    POLICY_VIOLATION = 1008  # a client that leaves too many replies unread
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    UNAUTHENTICATED = 4401
    HELLO_TIMEOUT = 4408


FrameId = str | int


class ProtocolError(Exception):
    """A client frame the server refuses; becomes an ``error`` frame (and maybe a close)."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        id: FrameId | None = None,
        session: str | None = None,
        close: CloseCode | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.id = id
        self.session = session
        self.close = close
