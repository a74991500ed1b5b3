"""Text frames to client-frame dataclasses and server frames to bytes: pure, no I/O.

:func:`parse_client_frame` checks everything the contract says about a frame's shape
(JSON object, known ``type``, required fields present and of the right type) and raises
:class:`~service.protocol.errors.ProtocolError` with the right code otherwise, echoing the
frame's ``id`` and ``session`` whenever those could be read. Ranges that depend on the
server (sampling bounds, limits) are checked by the server, not here. Unknown fields are
ignored, as the contract says.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import orjson

from service.protocol import frames
from service.protocol.errors import ErrorCode, FrameId, ProtocolError

MAX_ID_CHARS = 64
MAX_SESSION_CHARS = 64
MAX_TITLE_CHARS = 200
MAX_LIST_LIMIT = 200
DEFAULT_CHATS_LIMIT = 50
MAX_HISTORY_LIMIT = 10_000


def encode(frame: Mapping[str, Any]) -> bytes:
    """UTF-8 JSON of a server frame (send it as a text frame)."""
    return orjson.dumps(frame)


def _frame_id(obj: dict[str, Any]) -> FrameId | None:
    value = obj.get("id")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ProtocolError(ErrorCode.BAD_FRAME, "'id' must be a string or an integer")
    if len(str(value)) > MAX_ID_CHARS:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"'id' must be at most {MAX_ID_CHARS} characters")
    return value


class _Reader:
    """Typed access to one frame's fields; failures become ``bad_frame`` errors."""

    def __init__(self, obj: dict[str, Any], id: FrameId | None, session: str | None) -> None:
        self.obj = obj
        self.id = id
        self.session = session

    def fail(self, message: str, code: ErrorCode = ErrorCode.BAD_FRAME) -> ProtocolError:
        return ProtocolError(code, message, id=self.id, session=self.session)

    def text(self, name: str, *, required: bool = False, max_chars: int | None = None) -> str | None:
        value = self.obj.get(name)
        if value is None:
            if required:
                raise self.fail(f"missing field '{name}'")
            return None
        if not isinstance(value, str):
            raise self.fail(f"'{name}' must be a string")
        if max_chars is not None and len(value) > max_chars:
            raise self.fail(f"'{name}' must be at most {max_chars} characters")
        return value

    def required_text(self, name: str, *, max_chars: int | None = None) -> str:
        value = self.text(name, required=True, max_chars=max_chars)
        assert value is not None
        return value

    def name(self, name: str) -> str:
        """An identifier field: a non-empty string of at most 64 characters."""
        value = self.required_text(name, max_chars=MAX_SESSION_CHARS)
        if not value:
            raise self.fail(f"'{name}' must not be empty")
        return value

    def count(self, name: str, *, minimum: int, maximum: int | None = None) -> int | None:
        value = self.obj.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(f"'{name}' must be an integer")
        if value < minimum:
            raise self.fail(f"'{name}' must be at least {minimum}")
        return value if maximum is None else min(value, maximum)

    def params(self) -> frames.Params:
        value = self.obj.get("params")
        if value is None:
            return frames.Params()
        if not isinstance(value, dict):
            raise self.fail("'params' must be an object")
        return _params(value, self)

    def resume(self) -> frames.Resume | None:
        value = self.obj.get("resume")
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.fail("'resume' must be an object")
        inner = _Reader(value, self.id, self.session)
        index = inner.count("index", minimum=0)
        if index is None:
            raise self.fail("missing field 'resume.index'")
        return frames.Resume(message=inner.name("message"), index=index)


def _number(params: dict[str, Any], name: str, reader: _Reader) -> float | None:
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise reader.fail(f"params.{name} must be a number", ErrorCode.BAD_PARAMS)
    return float(value)


def _integer(params: dict[str, Any], name: str, reader: _Reader) -> int | None:
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise reader.fail(f"params.{name} must be an integer", ErrorCode.BAD_PARAMS)
    return value


def _params(params: dict[str, Any], reader: _Reader) -> frames.Params:
    """Types inside ``params`` are checked here (``bad_params``); ranges by the server."""
    stop = params.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise reader.fail("params.stop must be a list of strings", ErrorCode.BAD_PARAMS)
    if stop is not None and any("\x00" in s for s in stop):
        raise reader.fail("params.stop strings must not contain NUL", ErrorCode.BAD_PARAMS)
    return frames.Params(
        max_tokens=_integer(params, "max_tokens", reader),
        temperature=_number(params, "temperature", reader),
        top_p=_number(params, "top_p", reader),
        top_k=_integer(params, "top_k", reader),
        repetition_penalty=_number(params, "repetition_penalty", reader),
        seed=_integer(params, "seed", reader),
        stop=None if stop is None else tuple(stop),
    )


def parse_params(params: dict[str, Any]) -> frames.Params:
    """``params`` as stored with a chat (what ``Params.given()`` wrote) back to ``Params``."""
    return _params(params, _Reader(params, None, None))


def _hello(r: _Reader) -> frames.Hello:
    return frames.Hello(id=r.id, token=r.text("token", max_chars=1024), client=r.obj.get("client"))


def _open(r: _Reader) -> frames.Open:
    return frames.Open(
        id=r.id,
        session=r.name("session"),
        chat=r.name("chat") if r.obj.get("chat") is not None else None,
        model=r.text("model", max_chars=1024),
        system=r.text("system"),
        title=r.text("title", max_chars=MAX_TITLE_CHARS),
        params=r.params(),
        resume=r.resume(),
    )


def _send(r: _Reader) -> frames.Send:
    return frames.Send(id=r.id, session=r.name("session"), text=r.required_text("text"), params=r.params())


def _list_chats(r: _Reader) -> frames.ListChats:
    limit = r.count("limit", minimum=1, maximum=MAX_LIST_LIMIT)
    return frames.ListChats(
        id=r.id, limit=limit or DEFAULT_CHATS_LIMIT, before=r.text("before", max_chars=MAX_ID_CHARS)
    )


def _history(r: _Reader) -> frames.GetHistory:
    return frames.GetHistory(
        id=r.id,
        chat=r.name("chat"),
        limit=r.count("limit", minimum=1, maximum=MAX_HISTORY_LIMIT),
        before=r.text("before", max_chars=MAX_ID_CHARS),
    )


_PARSERS: dict[str, Callable[[_Reader], frames.ClientFrame]] = {
    "hello": _hello,
    "open": _open,
    "send": _send,
    "stop": lambda r: frames.Stop(id=r.id, session=r.name("session")),
    "close": lambda r: frames.Close(id=r.id, session=r.name("session")),
    "models": lambda r: frames.ListModels(id=r.id),
    "chats": _list_chats,
    "history": _history,
    "delete": lambda r: frames.Delete(id=r.id, chat=r.name("chat")),
    "ping": lambda r: frames.Ping(id=r.id),
}

CLIENT_FRAME_TYPES = frozenset(_PARSERS)


def parse_client_frame(text: str | bytes) -> frames.ClientFrame:
    """One client text frame to its dataclass; raises ``ProtocolError`` when it is refused."""
    try:
        obj = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(ErrorCode.BAD_FRAME, f"not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_FRAME, "a frame must be a JSON object")
    frame_id = _frame_id(obj)
    session = obj.get("session")
    valid_session = isinstance(session, str) and 0 < len(session) <= MAX_SESSION_CHARS
    reader = _Reader(obj, frame_id, session if valid_session else None)
    kind = obj.get("type")
    if kind is None:
        raise reader.fail("missing field 'type'")
    if not isinstance(kind, str):
        raise reader.fail("'type' must be a string")
    parser = _PARSERS.get(kind)
    if parser is None:
        raise reader.fail(f"unknown frame type {kind[:64]!r}", ErrorCode.UNKNOWN_TYPE)
    return parser(reader)


# ---- the client side: the inverse of parse_client_frame ---------------------------------------

_CLIENT_TYPES: dict[type[frames.ClientFrame], str] = {
    frames.Hello: "hello",
    frames.Open: "open",
    frames.Send: "send",
    frames.Stop: "stop",
    frames.Close: "close",
    frames.ListModels: "models",
    frames.ListChats: "chats",
    frames.GetHistory: "history",
    frames.Delete: "delete",
    frames.Ping: "ping",
}


def client_frame_dict(frame: frames.ClientFrame) -> dict[str, Any]:
    """A client frame as its JSON object: fields left ``None`` (and empty ``params``) are
    omitted, so ``parse_client_frame`` of its encoding gives ``frame`` back."""
    obj: dict[str, Any] = {"type": _CLIENT_TYPES[type(frame)]}
    for name in frame.__slots__:
        value = getattr(frame, name)
        if isinstance(value, frames.Params):
            value = value.given() or None
        elif isinstance(value, frames.Resume):
            value = {"message": value.message, "index": value.index}
        if value is not None:
            obj[name] = value
    return obj


def encode_client_frame(frame: frames.ClientFrame) -> bytes:
    """UTF-8 JSON of a client frame (send it as a text frame)."""
    return orjson.dumps(client_frame_dict(frame))
