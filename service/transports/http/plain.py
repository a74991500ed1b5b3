"""What every plain HTTP route shares: the caller (``Authorization: Bearer`` under ``--auth
token``), a JSON body within ``max_body_bytes``, errors as ``{"error": "<message>"}`` with a
status, and server-sent events with keep-alive comments.

The chat core's refusals map to statuses here once: bad input 400, unknown chat or model 404,
a chat already generating 409, a prompt longer than the context 413, too many generations of
one user 429, a full queue, a draining server or an unreachable database 503.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from service.config import ServerSettings
from service.core.chats import ChatCore
from service.engine.engine import Engine
from service.engine.tokenizer import ChatMessage
from service.engine.types import Delta
from service.errors import (
    Busy,
    ContextOverflow,
    Draining,
    InvalidParams,
    ModelError,
    NotFound,
    QueueFull,
    ServiceError,
    StoreUnavailable,
    TooManyRequests,
)
from service.protocol import codec, frames
from service.protocol.errors import ProtocolError
from service.store.records import User

Handler = Callable[[Request], Awaitable[Response]]


class PlainError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.message}, self.status, headers={"Cache-Control": "no-store"})


def from_service(exc: ServiceError) -> PlainError:
    """The chat core's and the engine's refusals as statuses."""
    if isinstance(exc, InvalidParams):
        return PlainError(400, str(exc))
    if isinstance(exc, NotFound):
        return PlainError(404, str(exc))
    if isinstance(exc, Busy):
        return PlainError(409, str(exc))
    if isinstance(exc, ContextOverflow):
        return PlainError(413, str(exc))
    if isinstance(exc, TooManyRequests):
        return PlainError(429, str(exc))
    if isinstance(exc, QueueFull | Draining):
        return PlainError(503, f"the server is overloaded: {exc}; try again")
    if isinstance(exc, StoreUnavailable):
        return PlainError(503, "the database is unavailable; try again shortly")
    if isinstance(exc, ModelError):
        return PlainError(503, str(exc))
    return PlainError(500, "internal error; see the server log")


class PlainRoutes:
    """Base of the route groups: the core, the settings and the shared request steps."""

    def __init__(self, core: ChatCore, settings: ServerSettings) -> None:
        self.core = core
        self.settings = settings

    def endpoint(self, handler: Handler) -> Handler:
        """``handler`` with ``PlainError`` and the core's refusals turned into responses."""

        async def run(request: Request) -> Response:
            try:
                return await handler(request)
            except PlainError as exc:
                return exc.response()
            except ServiceError as exc:
                return from_service(exc).response()

        return run

    async def user(self, request: Request) -> User:
        if self.settings.auth == "none":
            return self.core.local_user
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise PlainError(401, "send 'Authorization: Bearer <token>' with a token from 'users add'")
        user = await self.core.authenticate(token.strip())  # StoreUnavailable: 503
        if user is None:
            raise PlainError(401, "unknown or revoked token")
        return user

    async def body(self, request: Request) -> dict[str, Any]:
        """The request's JSON object (whatever ``Content-Type`` says: ``curl --json`` and
        ``-d`` both work); 413 past ``max_body_bytes``, 400 when it is not a JSON object."""
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PlainError(413, f"the request body is larger than {limit} bytes")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise PlainError(413, f"the request body is larger than {limit} bytes")
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise PlainError(400, f"the body is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise PlainError(400, "the body must be a JSON object")
        return value

    async def engine(self, model: object) -> tuple[str, Engine]:
        """The named model's engine (the default for ``None``); 404 for an unknown name."""
        if model is not None and not isinstance(model, str):
            raise PlainError(400, "model must be a string")
        name = model or self.core.models.default_id
        if name not in self.core.models:
            raise PlainError(404, f"no model {name!r}; GET /v1/models lists them")
        return name, await self.core.engine(name)

    def events(self, source: AsyncIterator[ServerSentEvent]) -> EventSourceResponse:
        return event_stream(source, self.settings.sse_keepalive_s)


def event_stream(
    source: AsyncIterator[ServerSentEvent] | AsyncIterator[bytes], keepalive_s: float
) -> EventSourceResponse:
    """A ``text/event-stream`` response of ``source`` (events, or bytes already encoded), with a
    ``: keep-alive`` comment every ``keepalive_s`` while nothing else is sent."""
    return EventSourceResponse(
        source,
        sep="\n",
        ping=keepalive_s,
        ping_message_factory=lambda: ServerSentEvent(comment="keep-alive", sep="\n"),
        headers={"Cache-Control": "no-store"},
    )


PARAM_NAMES = ("max_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop")
ROLES = ("system", "user", "assistant")


def params_from(body: dict[str, Any]) -> frames.Params:
    """The sampling parameters of a request: its ``params`` object (those of ``chat.v1``),
    or the same fields at the top level; the object wins where both name one. Types are checked
    here (400); ranges and defaults by the chat core's ``sampling``."""
    nested = body.get("params", {})
    if nested is None:
        nested = {}
    if not isinstance(nested, dict):
        raise PlainError(400, "params must be an object")
    merged = {name: body[name] for name in PARAM_NAMES if body.get(name) is not None} | nested
    try:
        return codec.parse_params(merged)
    except ProtocolError as exc:
        raise PlainError(400, exc.message) from None


def messages_from(value: object) -> list[ChatMessage]:
    """A conversation: strings alternating user / assistant (the last the user's), or
    ``{"role", "content"}`` objects (roles system, user, assistant); 400 otherwise."""
    if not isinstance(value, list) or not value:
        raise PlainError(400, "messages must be a non-empty list")
    if all(isinstance(item, str) for item in value):
        if len(value) % 2 == 0:
            raise PlainError(400, "messages as strings alternate user / assistant and end with the user's")
        return [
            ChatMessage(role="user" if i % 2 == 0 else "assistant", content=text)
            for i, text in enumerate(value)
        ]
    messages = []
    for i, item in enumerate(value):
        if (
            not isinstance(item, dict)
            or item.get("role") not in ROLES
            or not isinstance(item.get("content"), str)
        ):
            raise PlainError(
                400, f'messages[{i}] must be a string or {{"role": system|user|assistant, "content": string}}'
            )
        messages.append(ChatMessage(role=item["role"], content=item["content"]))
    if messages[-1]["role"] != "user":
        raise PlainError(400, "the last message must be the user's")
    return messages


def token_data(delta: Delta) -> dict[str, Any]:
    """A token event's data: ``{"token", "index"}``, ``index`` the first generated token the text
    covers, with ``tokens`` when it covers more than one (a character split across tokens waits
    until it is whole)."""
    data: dict[str, Any] = {"token": delta.text, "index": delta.index}
    if delta.tokens > 1:
        data["tokens"] = delta.tokens
    return data


def data_event(payload: dict[str, Any], *, event_id: int | None = None) -> ServerSentEvent:
    """One ``data:`` event (with an ``id:`` line when ``event_id`` is given)."""
    return ServerSentEvent(
        orjson.dumps(payload).decode(), id=None if event_id is None else str(event_id), sep="\n"
    )
