"""A test client of ``chat.v1``: a real WebSocket, every received frame checked against
``schema/``, frames of many sessions buffered so a test can wait for the one it wants."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect

from tests.protocol.schema_check import validate_server_frame

TIMEOUT_S = float(os.environ.get("LOCALCHAT_TEST_TIMEOUT_S", "30"))
"""The one time unit of the service tests: how long to wait for anything."""

Frame = dict[str, Any]


@dataclass
class Reply:
    """Everything one ``send`` produced on its session."""

    started: Frame
    tokens: list[Frame] = field(default_factory=list)
    done: Frame = field(default_factory=dict)

    @property
    def text(self) -> str:
        return "".join(t["text"] for t in self.tokens)


class Client:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.received: list[Frame] = []  # every frame, in arrival order
        self._unread: list[Frame] = []
        self._receiving = asyncio.Lock()
        self._ids = 0

    @classmethod
    async def connect(cls, url: str, **kwargs: Any) -> Client:
        kwargs.setdefault("subprotocols", ["chat.v1"])
        ws = await connect(url, open_timeout=TIMEOUT_S, **kwargs)
        return cls(ws)

    async def close(self) -> None:
        await self.ws.close()

    async def send(self, frame: Frame) -> None:
        await self.ws.send(orjson.dumps(frame).decode())

    async def send_raw(self, data: str | bytes) -> None:
        await self.ws.send(data)

    def next_id(self) -> str:
        self._ids += 1
        return f"r{self._ids}"

    async def _receive(self) -> Frame:
        raw = await asyncio.wait_for(self.ws.recv(), TIMEOUT_S)
        assert isinstance(raw, str), "the server sent a binary frame"
        frame = orjson.loads(raw)
        validate_server_frame(frame)
        self.received.append(frame)
        return frame

    async def wait_for(self, predicate: Callable[[Frame], bool]) -> Frame:
        """The first unread frame matching ``predicate``; frames before it stay unread.
        Several tasks may wait at once (one per session, say): one receives at a time."""
        while True:
            for i, frame in enumerate(self._unread):
                if predicate(frame):
                    return self._unread.pop(i)
            async with self._receiving:
                if not any(predicate(f) for f in self._unread):
                    self._unread.append(await self._receive())

    async def request(self, frame: Frame) -> Frame:
        """Send a frame with a fresh id and return the reply that echoes it."""
        frame_id = self.next_id()
        await self.send({**frame, "id": frame_id})
        return await self.wait_for(lambda f: f.get("id") == frame_id)

    async def hello(self, **fields: Any) -> Frame:
        welcome = await self.request({"type": "hello", **fields})
        assert welcome["type"] == "welcome", welcome
        return welcome

    async def open(self, session: str, **fields: Any) -> Frame:
        opened = await self.request({"type": "open", "session": session, **fields})
        assert opened["type"] == "opened", opened
        return opened

    async def start(self, session: str, text: str, **params: Any) -> Frame:
        frame: Frame = {"type": "send", "session": session, "text": text}
        if params:
            frame["params"] = params
        started = await self.request(frame)
        assert started["type"] == "started", started
        return started

    async def finish(self, session: str, started: Frame) -> Reply:
        """Read the token frames and the ``done`` of a started generation."""
        reply = Reply(started=started)
        while True:
            frame = await self.wait_for(
                lambda f: f.get("session") == session and f["type"] in ("token", "done")
            )
            if frame["type"] == "done":
                reply.done = frame
                return reply
            reply.tokens.append(frame)

    async def chat(self, session: str, text: str, **params: Any) -> Reply:
        return await self.finish(session, await self.start(session, text, **params))
