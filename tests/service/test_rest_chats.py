"""The REST chat API (``/chats``) against the real server: the flow end to end, reattaching an
event stream with ``Last-Event-ID``, replay from the database, stop, and isolation between users."""

from __future__ import annotations

import asyncio
from typing import Any
from uuid import UUID, uuid4

import pytest

from service.core.chats import completion, stored_deltas
from service.core.metrics import CancelCause
from service.engine.types import Delta, FinishReason, GenerationResult
from service.server import ChatServer
from service.store.records import StoredReply
from service.transports.http.chats import token_event
from tests.service.client import TIMEOUT_S, Client
from tests.service.conftest import ServiceFactory, ws_url
from tests.service.rest_api import (
    ReplyGates,
    RestApi,
    covered,
    reply_gate_fixture,  # noqa: F401  (the reply_gate fixture)
    running,
    text_of,
)
from tests.service.test_auth import add_user

STOP = "/chats/{chat}/messages/{message}/stop"


async def test_a_chat_over_rest_end_to_end(
    server: ChatServer, reply_gate: ReplyGates, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Create, send, stream, replay from storage, stop, share with chat.v1, delete: every answer
    as schema/openapi.yaml documents it."""
    api = RestApi(server)
    chat = await api.new_chat(title="REST", system="Be brief.", params={"temperature": 0})
    assert [c["chat"] for c in (await api.call("GET", "/chats", 200))["chats"]] == [chat]

    message = await api.send(chat, "Hello there", max_tokens=12)
    live = await api.all_events(chat, message)
    done = live[-1].data
    assert done["done"]
    assert done["message"] == message
    assert done["status"] == "complete"
    total = done["total_tokens"]
    assert live[-1].id == str(total)
    assert covered(live) == list(range(total))
    shown = await api.call("GET", "/chats/{chat}", 200, chat=chat)
    assert [m["role"] for m in shown["messages"]] == ["system", "user", "assistant"]
    assert shown["messages"][2] == {**shown["messages"][2], "id": message, "text": text_of(live)}
    assert shown["generating"] == []

    # Finished: it replays from the database with the same events, ids and end.
    assert UUID(message) not in server.core.replies.running
    assert await api.all_events(chat, message) == live
    assert await api.all_events(chat, message, last_event_id=live[0].id) == live[1:]
    assert await api.all_events(chat, message, last_event_id=live[-2].id) == live[-1:]
    assert await api.events_status(chat, message, last_event_id=live[-1].id) == 204
    assert await api.call("POST", STOP, 200, chat=chat, message=message) == done

    # The same chat in chat.v1: its history, continued there, shown here.
    ws = await Client.connect(ws_url(server))
    await ws.hello()
    opened = await ws.open("s", chat=chat)
    assert [m["text"] for m in opened["messages"]] == [m["text"] for m in shown["messages"]]
    await ws.chat("s", "And then?", max_tokens=4)
    await ws.close()
    assert len((await api.call("GET", "/chats/{chat}", 200, chat=chat))["messages"]) == 5

    # Stop a running reply; a second message meanwhile is refused.
    gate = reply_gate(server)
    long = await api.send(chat, "Tell me more", max_tokens=200)
    gate.watch(running(server, long))
    await gate.run_to(1)
    busy = await api.call("POST", "/chats/{chat}/messages", 409, json={"content": "again"}, chat=chat)
    assert "already" in busy["error"]
    assert (await api.call("GET", "/chats/{chat}", 200, chat=chat))["generating"] == [long]
    reply = running(server, long)
    cancelled = asyncio.Event()

    def cancel(cause: CancelCause, _cancel: object = reply.cancel) -> None:
        _cancel(cause)  # type: ignore[operator]
        cancelled.set()

    monkeypatch.setattr(reply, "cancel", cancel)
    async with api.events(chat, long) as stream:
        first = await stream.next()
        stop = asyncio.create_task(api.call("POST", STOP, 200, chat=chat, message=long))
        await asyncio.wait_for(cancelled.wait(), TIMEOUT_S)
        gate.release()
        stopped = await stop
        streamed = [first, *await stream.rest()]
    assert stopped["status"] == "cancelled"
    assert stopped["reason"] == "cancelled"
    assert streamed[-1].data == stopped
    assert stopped["total_tokens"] < 200
    assert covered(streamed) == list(range(stopped["total_tokens"]))
    history = (await api.call("GET", "/chats/{chat}", 200, chat=chat))["messages"]
    assert history[-1] == {**history[-1], "id": long, "status": "cancelled", "text": text_of(streamed)}

    # Refusals.
    await api.call("POST", "/chats/{chat}/messages", 400, json={"params": {}}, chat=chat)
    await api.call("POST", "/chats/{chat}/messages", 400, json={"content": "x", "max_tokens": 0}, chat=chat)
    await api.call("POST", "/chats", 404, json={"model": "no-such-model"})
    assert await api.events_status(chat, long, last_event_id="x") == 400
    assert await api.events_status(chat, history[1]["id"]) == 404  # a user message has no events
    await api.call("GET", "/chats/{chat}", 404, chat="not-a-chat")

    await api.call("DELETE", "/chats/{chat}", 200, chat=chat)
    await api.call("GET", "/chats/{chat}", 404, chat=chat)
    assert await api.events_status(chat, message) == 404
    assert (await api.call("GET", "/chats", 200))["chats"] == []
    await api.close()


async def test_a_dropped_event_stream_resumes_with_last_event_id(
    start_service: ServiceFactory, reply_gate: ReplyGates, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that disconnects mid-stream and comes back with ``Last-Event-ID`` gets the tokens
    generated meanwhile and the rest, each exactly once; with no reader at all (and no disconnect
    grace) the reply runs on to its end. Event streams count against ``max_connections``."""
    async with start_service(max_connections=1) as server:
        await _drop_and_resume(server, reply_gate, monkeypatch)


async def _drop_and_resume(
    server: ChatServer, reply_gate: ReplyGates, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = RestApi(server)
    gate = reply_gate(server)
    chat = await api.new_chat()
    message = await api.send(chat, "Count to ten", max_tokens=40, temperature=0)
    reply = running(server, message)
    gate.watch(reply)
    await gate.run_to(2)
    reader_left = asyncio.Event()

    def detach(grace_s: float, sink: object = None, _detach: Any = reply.detach) -> None:
        _detach(grace_s, sink)
        if sink is not gate:
            reader_left.set()

    monkeypatch.setattr(reply, "detach", detach)

    async with api.events(chat, message) as stream:
        first = await stream.next()
        assert first is not None
        assert stream.retry == 1000
    await asyncio.wait_for(reader_left.wait(), TIMEOUT_S)  # the server saw the client go
    await gate.run_to(6)  # generated while nobody reads
    assert reply.generated_tokens == 6
    assert covered([first])[-1] < 2
    assert server.settings.server.disconnect_grace_s == 0
    reply.detach(0, gate)
    assert not reply.attached
    assert reply.result is None

    async with api.events(chat, message, last_event_id=first.id) as stream:
        caught_up = await stream.next()
        assert caught_up is not None
        assert await api.events_status(chat, message) == 503  # one stream at once
        gate.release()
        after = [caught_up, *await stream.rest()]
    assert covered(after)[0] == covered([first])[-1] + 1
    events = [first, *after]
    assert events[-1].data["status"] == "complete"
    total = events[-1].data["total_tokens"]
    assert covered(events) == list(range(total))
    stored = (await api.call("GET", "/chats/{chat}", 200, chat=chat))["messages"][-1]
    assert stored["id"] == message
    assert stored["text"] == text_of(events)
    await api.close()


async def test_another_users_chat_is_not_found(start_service: ServiceFactory) -> None:
    """Under ``--auth token`` every route wants a user's token (401 without), and another user's
    chat and replies answer 404 on every route, exactly like missing ones."""
    async with start_service(auth="token") as server:
        _, alice_token = await add_user(server, "alice")
        _, bob_token = await add_user(server, "bob")
        alice, bob, nobody = RestApi(server, alice_token), RestApi(server, bob_token), RestApi(server)
        await nobody.call("GET", "/chats", 401)
        stranger = RestApi(server, "not-a-token")
        await stranger.call("POST", "/chats", 401, json={})
        await stranger.close()

        chat = await alice.new_chat(title="alice's")
        message = await alice.send(chat, "Hi", max_tokens=4, temperature=0)
        # A browser's EventSource cannot send headers: the token may come as access_token.
        async with nobody.events(chat, message, access_token=alice_token) as stream:
            events = await stream.rest()
        assert events[-1].data["done"]
        assert await nobody.events_status(chat, message) == 401

        assert (await bob.call("GET", "/chats", 200))["chats"] == []
        await bob.call("GET", "/chats/{chat}", 404, chat=chat)
        await bob.call("POST", "/chats/{chat}/messages", 404, json={"content": "mine?"}, chat=chat)
        assert await bob.events_status(chat, message) == 404
        await bob.call("POST", STOP, 404, chat=chat, message=message)
        await bob.call("DELETE", "/chats/{chat}", 404, chat=chat)
        shown = await alice.call("GET", "/chats/{chat}", 200, chat=chat)
        assert [m["role"] for m in shown["messages"]] == ["user", "assistant"]
        for api in (alice, bob, nobody):
            await api.close()


def test_a_stored_reply_replays_as_it_streamed() -> None:
    """The store keeps each delta's tokens and characters, so the replay of a finished reply has
    the live events' ids even where one delta covered several tokens (a character split across
    tokens, text held back for a stop string) or none of the text (a cancelled tail)."""
    deltas = [Delta(0, "Hé", 1), Delta(1, "llo wo", 3), Delta(4, "", 2)]
    result = GenerationResult(
        reason=FinishReason.CANCELLED,
        text="Héllo wo",
        token_ids=[5, 6, 7, 8, 9, 10],
        prompt_tokens=3,
        cached_tokens=0,
        completion_tokens=6,
        queued_ms=0.0,
        ttft_ms=1.0,
        total_ms=2.0,
        tokens_per_s=1.0,
    )

    def stored(deltas: list[Delta]) -> StoredReply:
        c = completion(result, deltas)
        return StoredReply(
            id=uuid4(),
            chat_id=uuid4(),
            status=c.status,
            text=c.text,
            token_ids=c.token_ids,
            delta_tokens=c.delta_tokens,
            delta_chars=c.delta_chars,
            reason=c.reason,
            prompt_tokens=c.prompt_tokens,
            cached_tokens=c.cached_tokens,
            queued_ms=c.queued_ms,
            ttft_ms=c.ttft_ms,
            total_ms=c.total_ms,
            tokens_per_s=c.tokens_per_s,
            error=c.error,
        )

    assert stored_deltas(stored(deltas)) == deltas
    assert [token_event(d).id for d in deltas] == ["0", "3", "5"]
    # Deltas that do not account for the reply exactly are not kept: it replays as one delta.
    assert stored_deltas(stored(deltas[:2])) == [Delta(0, "Héllo wo", 6)]
