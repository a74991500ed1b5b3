"""One connection's outgoing frames, in order, with token text coalesced under backpressure.

The connection's writer task takes frames one at a time and awaits each send; while it is
blocked on a slow reader, new token text of a session is appended to that session's token
frame still waiting in the queue instead of queueing another frame. So a stalled client
costs one growing frame per generating session, never one frame per token, and a client
that keeps up gets every token in its own frame the moment it is made.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping
from typing import Any

from service.engine.types import Delta
from service.protocol import frames


class OutboxClosed(Exception):
    """The connection is gone: nothing more will be sent."""


class Outbox:
    def __init__(self, max_frames: int = 1024) -> None:
        self.max_frames = max_frames
        self.overflowed = False  # the client left more than max_frames unread: drop it
        self._frames: deque[Mapping[str, Any]] = deque()
        self._unsent_tokens: dict[str, frames.TokenFrame] = {}
        self._ready = asyncio.Event()
        self._closed = False

    def __len__(self) -> int:
        return len(self._frames)

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, frame: Mapping[str, Any]) -> None:
        if self._closed:
            return
        if len(self._frames) >= self.max_frames:
            self.overflowed = True
            return
        session = frame.get("session")
        if isinstance(session, str):
            # Later token text must not jump ahead of this frame.
            self._unsent_tokens.pop(session, None)
        self._frames.append(frame)
        self._ready.set()

    def put_token(self, session: str, delta: Delta) -> None:
        if self._closed:
            return
        waiting = self._unsent_tokens.get(session)
        if waiting is not None and waiting["index"] + waiting.get("tokens", 1) == delta.index:
            waiting["text"] += delta.text
            waiting["tokens"] = waiting.get("tokens", 1) + delta.tokens
            return
        frame = frames.token(session, delta.index, delta.text, delta.tokens)
        self._frames.append(frame)
        self._unsent_tokens[session] = frame
        self._ready.set()

    async def get(self) -> Mapping[str, Any]:
        """The next frame to send; raises ``OutboxClosed`` once closed and drained."""
        while not self._frames:
            if self._closed:
                raise OutboxClosed
            self._ready.clear()
            await self._ready.wait()
        frame = self._frames.popleft()
        session = frame.get("session")
        if isinstance(session, str) and self._unsent_tokens.get(session) is frame:
            del self._unsent_tokens[session]
        return frame

    def close(self) -> None:
        """Refuse new frames; the writer still drains what is queued."""
        self._closed = True
        self._ready.set()
