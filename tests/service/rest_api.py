"""A test client of the REST chat API (``/chats``): httpx against the real server, every request
and response checked against ``schema/openapi.yaml``, event streams parsed as a browser would."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import httpx
import orjson
import pytest

from service.core.reply import Reply
from service.engine.types import Delta, GenerationResult
from service.server import ChatServer
from tests.engine_gate import EngineGate, installed_gates
from tests.protocol.openapi_check import validate_event, validate_json, validate_request
from tests.service.client import TIMEOUT_S

EVENTS = "/chats/{chat}/messages/{message}/events"
_MAX_HOLD_S = 60.0  # as tests/engine_gate.py: a gate left closed by a failing test cannot hang the suite


@dataclass(frozen=True, slots=True)
class Event:
    id: str | None
    data: dict[str, Any]


def covered(events: list[Event]) -> list[int]:
    """The token indexes the token events cover, in order (each event its own range)."""
    indexes: list[int] = []
    for event in events:
        if "token" in event.data:
            first, count = event.data["index"], event.data.get("tokens", 1)
            assert event.id == str(first + count - 1), event
            indexes += range(first, first + count)
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


class ReplyGate(EngineGate):
    """Holds the engine before a model run while the reply it watches has ``limit`` tokens or
    more (every run, until it watches one). The check runs in the engine's thread before each
    run, so the reply stops at exactly ``limit`` tokens however busy the event loop is. It is also
    a sink of the reply, so a test can wait until those tokens are out."""

    def __init__(self) -> None:
        super().__init__()
        self._limit: int | None = 0
        self._reply: Reply | None = None
        self.tokens = 0  # generated tokens the reply's deltas have covered so far
        self._changed = asyncio.Event()

    def _held(self) -> bool:
        made = 0 if self._reply is None else self._reply.generated_tokens
        return self._limit is not None and made >= self._limit

    def wait(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: not self._held(), timeout=_MAX_HOLD_S)

    def _open_to(self, limit: int | None) -> None:
        with self._cond:
            self._limit = limit
            self._cond.notify_all()

    def hold(self, runs: int = 0) -> None:
        raise NotImplementedError("a ReplyGate holds at a token count: run_to()")

    def release(self) -> None:
        self._open_to(None)

    def watch(self, reply: Reply) -> None:
        with self._cond:
            self._reply = reply
        reply.attach(self)

    async def run_to(self, tokens: int) -> None:
        """Let the watched reply reach ``tokens`` tokens, hold it there, and wait until they are out."""
        self._open_to(tokens)
        while self.tokens < tokens:
            self._changed.clear()
            await asyncio.wait_for(self._changed.wait(), TIMEOUT_S)

    def delta(self, delta: Delta) -> None:
        self.tokens = delta.index + delta.tokens
        self._changed.set()

    def done(self, reply: Reply, result: GenerationResult) -> None:
        self._changed.set()


ReplyGates = Callable[[ChatServer], ReplyGate]


@pytest.fixture(name="reply_gate")
def reply_gate_fixture(monkeypatch: pytest.MonkeyPatch) -> Iterator[ReplyGates]:
    """``reply_gate(server)``: a :class:`ReplyGate` on that server's engines, released at teardown."""
    yield from installed_gates(ReplyGate, monkeypatch)


def running(server: ChatServer, message: str) -> Reply:
    return server.core.replies.running[UUID(message)]
