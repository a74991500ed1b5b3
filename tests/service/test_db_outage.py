"""PostgreSQL killed and restarted under a live service: streaming goes on, /readyz says 503,
reads fail cleanly, and once the database is back every message and reply is stored."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import pytest

from service.config import ServiceSettings
from service.core.reply import Reply as Generation
from service.engine.types import GenerationResult
from service.server import ChatServer
from service.store.durable import DurableStore
from tests.engine_gate import GateFactory
from tests.private_postgres import PrivatePostgres, private_postgres
from tests.service.client import TIMEOUT_S, Client, Frame
from tests.service.test_http import get

LONG = {"temperature": 0, "max_tokens": 200}


@pytest.fixture
async def pg() -> AsyncIterator[PrivatePostgres]:
    """A PostgreSQL of this test's own (the shared cluster must never be stopped)."""
    async with private_postgres() as server:
        yield server


@pytest.fixture
def service_settings(service_settings: ServiceSettings, pg: PrivatePostgres) -> ServiceSettings:
    """The shared service settings, on the private PostgreSQL."""
    return dataclasses.replace(service_settings, database_url=pg.dsn)


@pytest.fixture
def finished(
    monkeypatch: pytest.MonkeyPatch, server: ChatServer
) -> dict[str, tuple[list[int], GenerationResult]]:
    """What each generation consumed and produced (prompt ids, result), by assistant message id."""
    results: dict[str, tuple[list[int], GenerationResult]] = {}
    store_result = server.store_result

    async def recording(generation: Generation, result: GenerationResult) -> None:
        results[str(generation.message_id)] = (list(generation.prompt_ids), result)
        await store_result(generation, result)

    monkeypatch.setattr(server, "store_result", recording)
    return results


def _token_text(client: Client, session: str) -> str:
    return "".join(f["text"] for f in client.received if f.get("session") == session and f["type"] == "token")


async def _readyz(server: ChatServer) -> tuple[int, dict[str, Any]]:
    status, _, body = await get(server, "/readyz")
    return status, orjson.loads(body)


async def _pending_writes_metric(server: ChatServer) -> float:
    _, _, body = await get(server, "/metrics")
    for line in body.decode().splitlines():
        if line.startswith("localchat_pending_writes "):
            return float(line.split()[1])
    raise AssertionError("no localchat_pending_writes in /metrics")


async def _refused_for_the_database(client: Client, frame: Frame) -> None:
    reply = await client.request(frame)
    assert (reply["type"], reply["code"]) == ("error", "internal"), reply
    assert "database" in reply["message"]


async def test_postgres_killed_and_restarted_mid_stream_loses_no_reply(
    server: ChatServer,
    client: Client,
    pg: PrivatePostgres,
    engine_gate: GateFactory,
    finished: dict[str, tuple[list[int], GenerationResult]],
) -> None:
    """Kill PostgreSQL while a reply streams: it streams on to ``done``; /readyz is 503; a send on
    another session and on a chat opened during the outage still stream; reads get a clean error;
    after the restart every user message and reply is stored with its text, status and token ids."""
    store = server.store
    assert isinstance(store, DurableStore)
    chats = {"a": (await client.open("a"))["chat"], "b": (await client.open("b"))["chat"]}

    gate = engine_gate(server)
    gate.hold(8)  # prefill + 7 decode steps, then the engine waits: "a" is mid-stream
    a_started = await client.start("a", "Tell me a long story about a lighthouse.", **LONG)
    await client.wait_for(lambda f: f.get("session") == "a" and f["type"] == "token")
    assert uuid.UUID(a_started["message"]) in server._generations  # still generating
    await asyncio.to_thread(pg.stop, "immediate")  # a crash: every connection cut
    status, ready = await _readyz(server)
    assert status == 503, ready
    assert "database" in ready["reason"], ready
    gate.release()
    a_done = await client.finish("a", a_started)
    assert a_done.done["reason"] in ("stop", "length")

    # During the outage: the reply is queued, readiness says so, new work still streams.
    assert store.pending_writes >= 1
    assert await _pending_writes_metric(server) >= 1
    status, ready = await _readyz(server)
    assert status == 503, ready
    assert "write" in ready["reason"], ready
    b_reply = await client.chat("b", "And a short poem?", temperature=0, max_tokens=40)
    chats["c"] = (await client.open("c", system="You are terse."))["chat"]  # a new chat, journaled
    c_reply = await client.chat("c", "Hello there", temperature=0, max_tokens=40)
    assert b_reply.done["reason"] in ("stop", "length")
    assert c_reply.done["reason"] in ("stop", "length")
    await _refused_for_the_database(client, {"type": "history", "chat": chats["a"]})
    await _refused_for_the_database(client, {"type": "chats"})
    await _refused_for_the_database(client, {"type": "open", "session": "again", "chat": chats["a"]})
    assert (await client.request({"type": "ping"}))["type"] == "pong"  # the connection goes on
    assert store.pending_writes == 6  # a's reply; b's turn and reply; c's chat, turn and reply

    await asyncio.to_thread(pg.start)
    await asyncio.wait_for(store.journal.drained(), TIMEOUT_S)
    await server.idle()
    assert (await _readyz(server))[0] == 200
    assert await _pending_writes_metric(server) == 0
    assert store.journal.dropped == 0

    sent = {"a": "Tell me a long story about a lighthouse.", "b": "And a short poem?", "c": "Hello there"}
    replies = {"a": a_done, "b": b_reply, "c": c_reply}
    conn = await asyncpg.connect(pg.dsn)
    try:
        for session, chat in chats.items():
            history = await client.request({"type": "history", "chat": chat})
            assert history["type"] == "history", history
            rows = await conn.fetch(
                "SELECT id, role, text, status, token_ids, prompt_offset, completion_tokens"
                " FROM messages WHERE chat_id = $1 ORDER BY seq",
                uuid.UUID(chat),
            )
            user, reply = rows[-2:]
            message_id = replies[session].started["message"]
            prompt_ids, result = finished[message_id]
            streamed = _token_text(client, session)
            assert [(m["role"], m["text"], m["status"]) for m in history["messages"][-2:]] == [
                ("user", sent[session], "complete"),
                ("assistant", streamed, "complete"),
            ]
            assert (user["role"], user["text"], list(user["token_ids"])) == (
                "user",
                sent[session],
                prompt_ids[user["prompt_offset"] :],
            )
            assert (str(reply["id"]), reply["text"], list(reply["token_ids"])) == (
                message_id,
                result.text,
                result.token_ids,
            )
            assert (
                reply["completion_tokens"]
                == len(result.token_ids)
                == replies[session].done["usage"]["completion_tokens"]
            )
        c_history = await client.request({"type": "history", "chat": chats["c"]})
        assert [m["role"] for m in c_history["messages"]] == ["system", "user", "assistant"]
    finally:
        await conn.close()


async def test_past_the_write_backlog_bound_a_send_is_overloaded_until_the_database_returns(
    server: ChatServer, client: Client, pg: PrivatePostgres
) -> None:
    """With the database down and the journal at its bound, ``send`` gets ``overloaded`` (nothing
    starts, the connection stays); once the database is back the session works again."""
    store = server.store
    assert isinstance(store, DurableStore)
    store.journal.max_pending = 1
    chat = (await client.open("s"))["chat"]
    await asyncio.to_thread(pg.stop, "fast")
    first = await client.chat("s", "one", temperature=0, max_tokens=8)  # its turn fills the journal
    refused = await client.request({"type": "send", "session": "s", "text": "two"})
    assert (refused["type"], refused["code"], refused["session"]) == ("error", "overloaded", "s"), refused

    await asyncio.to_thread(pg.start)
    await asyncio.wait_for(store.journal.drained(), TIMEOUT_S)
    second = await client.chat("s", "three", temperature=0, max_tokens=8)
    await server.idle()
    history = await client.request({"type": "history", "chat": chat})
    assert [(m["role"], m["text"]) for m in history["messages"]] == [
        ("user", "one"),
        ("assistant", first.text),
        ("user", "three"),
        ("assistant", second.text),
    ]
