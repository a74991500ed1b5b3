"""``/ws``: the WebSocket handshake's checks, then one :class:`Connection` per socket.

The handshake is refused with 403 for a foreign ``Origin`` (see :mod:`service.access`) and
with 503 past the connection limit; ``chat.v1`` is accepted when offered, and a client that
offers no subprotocol is served all the same.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, Protocol

from starlette.types import Message, Receive, Scope, Send

from service.access import AccessPolicy
from service.protocol.frames import PROTOCOL
from service.transports.http.pages import TEXT, respond
from service.transports.ws.connection import Connection, Host
from service.transports.ws.socket import SocketClosed


class _Carrier(Protocol):
    transport: asyncio.Transport


class AsgiSocket:
    """An accepted ASGI WebSocket as a :class:`~service.transports.ws.socket.Socket`.

    ``transport`` is the TCP connection under uvicorn's protocol, whose ``send`` is a bound
    method of it: a peer that reads nothing for the send timeout is cut off through it.
    """

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        carrier: _Carrier = send.__self__  # type: ignore[attr-defined]
        self.transport = carrier.transport
        self._closed = False

    async def recv(self) -> str | bytes:
        if self._closed:
            raise SocketClosed
        message = await self._receive()
        if message["type"] == "websocket.receive":
            text = message.get("text")
            return text if text is not None else bytes(message.get("bytes") or b"")
        self._closed = True
        raise SocketClosed

    async def send(self, text: bytes) -> None:
        await self._put({"type": "websocket.send", "text": text.decode()})

    async def close(self, code: int, reason: str) -> None:
        with contextlib.suppress(SocketClosed):
            await self._put({"type": "websocket.close", "code": code, "reason": reason})

    async def _put(self, message: Message) -> None:
        try:
            await self._send(message)
        except (OSError, RuntimeError):  # the peer is gone, or the socket is closing
            raise SocketClosed from None


class WebSocketEndpoint:
    """The ASGI application of ``/ws``; keeps the open connections."""

    def __init__(
        self,
        host: Host,
        access: AccessPolicy,
        port: Callable[[], int],
        max_connections: int,
        on_change: Callable[[], None],
        on_count: Callable[[int], None],
    ) -> None:
        self._host = host
        self._access = access
        self._port = port
        self._max_connections = max_connections
        self._on_change = on_change
        self._on_count = on_count
        self.connections: dict[Connection, None] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        origins = [v.decode("latin-1") for k, v in scope["headers"] if k.lower() == b"origin"]
        if len(origins) > 1 or not self._access.origin_allowed(next(iter(origins), None), self._port()):
            await respond(403, "Origin not allowed\n", TEXT)(scope, receive, send)
            return
        if len(self.connections) >= self._max_connections:
            await respond(503, "too many connections\n", TEXT)(scope, receive, send)
            return
        if (await receive())["type"] != "websocket.connect":
            return
        offered: list[Any] = scope.get("subprotocols", [])
        await send({"type": "websocket.accept", "subprotocol": PROTOCOL if PROTOCOL in offered else None})
        connection = Connection(self._host, AsgiSocket(receive, send))
        self.connections[connection] = None
        self._on_count(1)
        try:
            await connection.run()
        finally:
            del self.connections[connection]
            self._on_count(-1)
            self._on_change()
