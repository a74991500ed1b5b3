"""tui_client.client on its own (no Textual) against a real service."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from service.protocol import frames
from service.server import ChatServer
from tests.recorder import Recorder as BaseRecorder
from tests.service.client import TIMEOUT_S
from tests.service.conftest import ServiceFactory, ws_url
from tests.tui.helpers import FAST_BACKOFF, stored
from tui_client.client import (
    ChatClient,
    ClientEvent,
    Connected,
    ConnectionLost,
    Disconnected,
    Failed,
    ServerError,
    SessionFrame,
    SessionRestored,
)

GREEDY = frames.Params(temperature=0.0, max_tokens=8)


class Recorder(BaseRecorder[ClientEvent]):
    """Collects a client's events; ``wait`` for the first ones of a type."""

    async def wait(self, match: type[ClientEvent], *, count: int = 1) -> list[ClientEvent]:
        """The events of type ``match``, once there are ``count`` of them."""
        await self.until(lambda: len(self.of(match)) >= count)
        return self.of(match)

    def of(self, match: type[ClientEvent]) -> list[ClientEvent]:
        return [e for e in self.events if isinstance(e, match)]

    def texts(self, session: str) -> str:
        return "".join(
            e.frame["text"]
            for e in self.events
            if isinstance(e, SessionFrame) and e.session == session and e.frame["type"] == "token"
        )

    def done(self, session: str) -> list[frames.ServerFrame]:
        return [
            e.frame
            for e in self.events
            if isinstance(e, SessionFrame) and e.session == session and e.frame["type"] == "done"
        ]


async def test_sessions_get_their_own_frames_and_requests_their_replies(server: ChatServer) -> None:
    """Two sessions on one connection: each session's frames reach it alone; request
    errors raise ServerError with the code and leave the connection up."""
    events = Recorder()
    client = ChatClient(ws_url(server), on_event=events)
    welcome = await client.connect()
    assert welcome["protocol"] == "chat.v1"
    a = await client.open("a", params=GREEDY)
    b = await client.open("b", params=GREEDY)
    assert a["chat"] != b["chat"]
    await asyncio.gather(client.send("a", "Hi"), client.send("b", "Hello"))
    await events.until(lambda: bool(events.done("a") and events.done("b")))
    for name, opened in (("a", a), ("b", b)):
        assert events.texts(name) == (await stored(server, opened["chat"]))[-1]["text"]
    with pytest.raises(ServerError) as refused:
        await client.history("00000000-0000-0000-0000-000000000000")
    assert refused.value.code == "not_found"
    await client.ping()
    assert [m["id"] for m in await client.models()] == [m["id"] for m in welcome["models"]]
    await client.close("a")
    assert set(client.sessions) == {"b"}
    await client.aclose()


async def test_run_reconnects_and_reopens_open_sessions(server: ChatServer) -> None:
    """After the service drops the connection, run() reconnects with backoff, says hello again
    and reopens every open session on its chat; requests in between fail with ConnectionLost."""
    events = Recorder()
    client = ChatClient(ws_url(server), on_event=events, backoff=FAST_BACKOFF)
    runner = asyncio.create_task(client.run())
    await events.wait(Connected)
    opened = await client.open("a", params=GREEDY)
    await client.send("a", "Hi")
    await events.until(lambda: bool(events.done("a")))

    for connection in server.connections:
        connection.ws.transport.abort()
    disconnected = await events.wait(Disconnected)
    assert isinstance(disconnected[0], Disconnected)
    assert disconnected[0].attempt == 1
    restored = await events.wait(SessionRestored)
    assert isinstance(restored[0], SessionRestored)
    assert restored[0].opened["chat"] == opened["chat"]
    assert not restored[0].reattached
    assert [m["role"] for m in restored[0].opened["messages"]] == ["user", "assistant"]
    connected = await events.wait(Connected, count=2)
    assert [c.restored for c in connected if isinstance(c, Connected)] == [False, True]

    await client.send("a", "Again")  # the session goes on on the new connection
    await events.until(lambda: len(events.done("a")) == 2)
    await client.aclose()
    await runner

    with pytest.raises(ConnectionLost):
        await client.ping()


async def test_a_refused_token_gives_up_without_retrying(start_service: ServiceFactory) -> None:
    """With auth on, a wrong token ends run() with Failed: no reconnect loop."""
    async with start_service(auth="token") as server:
        events = Recorder()
        client = ChatClient(ws_url(server), token="wrong", on_event=events, backoff=FAST_BACKOFF)
        await asyncio.wait_for(client.run(), TIMEOUT_S)
        assert [type(e) for e in events.events] == [Failed]


def test_backoff_grows_and_is_capped() -> None:
    """Delays double from first_s up to max_s, within the jitter."""
    backoff = dataclasses.replace(FAST_BACKOFF, jitter=0.0)
    assert [backoff.delay(n) for n in (1, 2, 3, 10)] == [0.02, 0.04, 0.08, 0.2]
