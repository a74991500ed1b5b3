"""A test client of the REST chat API (``/chats``): httpx against the real server, every request
and response checked against ``schema/openapi.yaml``, event streams parsed as a browser would."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import httpx
import orjson

from service.core.reply import Reply
from service.engine.types import Delta, GenerationResult
from service.server import ChatServer
from tests.engine_gate import EngineGate
from tests.protocol.openapi_check import validate_event, validate_json, validate_request
from tests.service.client import TIMEOUT_S

EVENTS = "/chats/{chat}/messages/{message}/events"


@dataclass(frozen=True, slots=True)
class Event:
    id: str | None
    data: dict[str, Any]


def covered(events: list[Event]) -> list[int]:
    """The token indexes the token events cover, in order (each event its own range)."""
    indexes: list[int] = []
    for event in events:
        if "token" in event.data:
            last = event.data["index"]
            assert event.id == str(last), event
            indexes += range(last - event.data["tokens"] + 1, last + 1)
    return indexes


def text_of(events: list[Event]) -> str:
    return "".join(e.data["token"] for e in events if "token" in e.data)


class EventStream:
    """One open ``/events`` response, read event by event (``retry:`` and comments skipped)."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.retry: int | None = None
        self._lines = response.aiter_lines()

    async def next(self) -> Event | None:
        """The next event, or None when the stream has ended."""
        event_id: str | None = None
        data: list[str] = []
        async for line in self._lines:
            if not line:
                if data:
                    payload = orjson.loads("\n".join(data))
                    validate_event("GET", EVENTS, 200, payload)
                    return Event(event_id, payload)
                continue
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "id":
                event_id = value
            elif field == "data":
                data.append(value)
            elif field == "retry":
                self.retry = int(value)
        return None

    async def rest(self) -> list[Event]:
        """Every event until the stream ends."""
        events = []
        while (event := await self.next()) is not None:
            events.append(event)
        return events


class RestApi:
    def __init__(self, server: ChatServer, token: str | None = None) -> None:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        self.http = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{server.port}", headers=headers, timeout=TIMEOUT_S
        )

    async def close(self) -> None:
        await self.http.aclose()

    async def call(
        self, method: str, template: str, status: int, *, json: dict[str, Any] | None = None, **path: str
    ) -> Any:
        """``method template`` with ``path`` filled in; asserts ``status`` and the documented shape."""
        if json is not None and status < 300:
            validate_request(method, template, json)
        url = template.format(**path)
        response = await self.http.request(method, url, json=json)
        assert response.status_code == status, (method, url, response.status_code, response.text)
        body = response.json()
        validate_json(method, template, status, body)
        return body

    async def new_chat(self, **fields: Any) -> str:
        chat: str = (await self.call("POST", "/chats", 201, json=fields))["chat"]
        return chat

    async def send(self, chat: str, content: str, **params: Any) -> str:
        """Post a message; the reply's id."""
        body = {"content": content, "params": params}
        started = await self.call("POST", "/chats/{chat}/messages", 202, json=body, chat=chat)
        message: str = started["assistant_message"]
        return message

    @asynccontextmanager
    async def events(
        self, chat: str, message: str, *, last_event_id: str | None = None, **params: str
    ) -> AsyncIterator[EventStream]:
        headers = {} if last_event_id is None else {"Last-Event-ID": last_event_id}
        url = EVENTS.format(chat=chat, message=message)
        async with self.http.stream("GET", url, headers=headers, params=params) as response:
            assert response.status_code == 200, (response.status_code, await response.aread())
            assert response.headers["content-type"].startswith("text/event-stream")
            yield EventStream(response)

    async def all_events(self, chat: str, message: str, last_event_id: str | None = None) -> list[Event]:
        async with self.events(chat, message, last_event_id=last_event_id) as stream:
            return await stream.rest()

    async def events_status(self, chat: str, message: str, last_event_id: str | None = None) -> int:
        """The status of an ``/events`` request that does not stream (its JSON body checked)."""
        headers = {} if last_event_id is None else {"Last-Event-ID": last_event_id}
        response = await self.http.get(EVENTS.format(chat=chat, message=message), headers=headers)
        if response.status_code != 204:
            validate_json("GET", EVENTS, response.status_code, response.json())
        return response.status_code


class Progress:
    """A second sink on a running reply: lets a test wait for its tokens, and closes the engine
    gate once ``pause_at`` tokens are out."""

    def __init__(self, gate: EngineGate, reply: Reply) -> None:
        self.gate = gate
        self.tokens = 0
        self.pause_at: int | None = None
        self._changed = asyncio.Event()
        reply.attach(self)

    def delta(self, delta: Delta) -> None:
        self.tokens = delta.index + delta.tokens
        if self.pause_at is not None and self.tokens >= self.pause_at:
            self.gate.hold(0)
            self.pause_at = None
        self._changed.set()

    def done(self, reply: Reply, result: GenerationResult) -> None:
        self._changed.set()

    async def run_to(self, tokens: int) -> None:
        """Let the engine run until at least ``tokens`` are out, then hold it."""
        self.pause_at = tokens
        self.gate.release()
        while self.tokens < tokens:
            self._changed.clear()
            await asyncio.wait_for(self._changed.wait(), TIMEOUT_S)


def running(server: ChatServer, message: str) -> Reply:
    return server.core.replies.running[UUID(message)]
