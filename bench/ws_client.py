"""A bare chat.v1 client for the benchmarks: one connection, each frame stamped on receipt and
routed to its session's queue (frames without a session go to the queue ``""``)."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Self

import orjson
from websockets.asyncio.client import ClientConnection, connect

Stamped = tuple[float, dict[str, Any]]


class SessionClient:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.received = 0
        self.sent = 0
        self.queues: dict[str, asyncio.Queue[Stamped]] = {}
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, url: str) -> Self:
        """Connect and say hello."""
        client = cls(await connect(url, subprotocols=["chat.v1"], max_size=None))  # type: ignore[list-item]
        await client.send({"type": "hello"})
        await client.next("")
        return client

    async def _read(self) -> None:
        async for raw in self.ws:
            at = time.perf_counter()
            frame = orjson.loads(raw)
            self.received += 1
            self.queues.setdefault(frame.get("session", ""), asyncio.Queue()).put_nowait((at, frame))

    async def send(self, frame: dict[str, Any]) -> None:
        self.sent += 1
        await self.ws.send(orjson.dumps(frame).decode())

    async def next(self, session: str) -> Stamped:
        """The next frame of ``session`` and when it arrived; an ``error`` frame raises."""
        at, frame = await self.queues.setdefault(session, asyncio.Queue()).get()
        if frame["type"] == "error":
            raise RuntimeError(f"server error: {frame}")
        return at, frame

    async def close(self) -> None:
        await self.ws.close()
        await self._reader
