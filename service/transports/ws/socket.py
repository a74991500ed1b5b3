"""What a ``chat.v1`` connection needs of its WebSocket, whichever server carries it."""

from __future__ import annotations

import asyncio
from typing import Protocol


class SocketClosed(Exception):
    """The peer closed the WebSocket or the connection was lost."""


class Socket(Protocol):
    transport: asyncio.Transport  # the TCP connection underneath (to abort a peer that reads nothing)

    async def recv(self) -> str | bytes:
        """The next message; raises ``SocketClosed``."""
        ...

    async def send(self, text: bytes) -> None:
        """Send one text message (``text`` is its UTF-8); waits while the peer does not read;
        raises ``SocketClosed``."""
        ...

    async def close(self, code: int, reason: str) -> None: ...
