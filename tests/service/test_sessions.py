"""End to end over a real WebSocket: sessions, streaming, stop/close/disconnect, history."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import uuid
from pathlib import Path

import pytest

from service.app import running_service
from service.config import ServiceSettings
from service.engine.engine import GenerationStream
from service.engine.models.registry import PreparedModel
from service.engine.models.sampling_defaults import SamplingDefaults
from service.engine.types import ChatKey, SamplingParams
from service.server import ChatServer
from tests.engine_gate import GateFactory
from tests.service.client import Client, Frame, Reply
from tests.service.conftest import ServiceFactory, ws_url

GREEDY = {"temperature": 0}
LONG = {"temperature": 0, "max_tokens": 200}


def assert_contiguous(reply: Reply) -> None:
    """Token frames cover indices 0..n-1 without gap or overlap, and ``done`` counts them."""
    expected = 0
    for frame in reply.tokens:
        assert frame["index"] == expected, reply.tokens
        expected += frame.get("tokens", 1)
    assert expected == reply.done["usage"]["completion_tokens"]


async def stored_messages(client: Client, chat: str) -> list[dict[str, object]]:
    history = await client.request({"type": "history", "chat": chat})
    assert history["type"] == "history", history
    return list(history["messages"])


async def test_three_sessions_stream_at_once_on_one_connection(
    client: Client, server: ChatServer, engine_gate: GateFactory
) -> None:
    """Three sessions generate concurrently: b and c stream before a is done.

    Frame counts say nothing here, since a slow reader gets coalesced frames; what shows sharing is
    that b's and c's first tokens reach the client before a's ``done``, which a one-at-a-time
    scheduler would send first. The engine is held until all three are queued, so that a cannot
    finish before b's ``send`` arrives.
    """
    gate = engine_gate(server)
    gate.hold(0)
    chats = {}
    for name in ("a", "b", "c"):
        chats[name] = (await client.open(name))["chat"]
    started = {
        name: await client.start(name, f"Tell me about {name}", **GREEDY, max_tokens=40) for name in chats
    }
    gate.release()
    replies = await asyncio.gather(*(client.finish(name, started[name]) for name in chats))
    for reply in replies:
        assert_contiguous(reply)
        assert reply.done["reason"] in ("stop", "length")
    assert replies[0].done["usage"]["completion_tokens"] > 3, "a must outlast the others' first tokens"
    streamed = [(f["session"], f["type"]) for f in client.received if f["type"] in ("token", "done")]
    a_done = streamed.index(("a", "done"))
    for name in ("b", "c"):
        assert streamed.index((name, "token")) < a_done, f"{name} waited for a: {streamed}"
    await server.idle()
    for name, reply in zip(chats, replies, strict=True):
        messages = await stored_messages(client, chats[name])
        assert [m["role"] for m in messages] == ["user", "assistant"]
        assert messages[1]["text"] == reply.text
        assert messages[1]["id"] == reply.started["message"] == reply.done["message"]
        assert messages[1]["status"] == "complete"


async def test_stop_cancels_and_stores_the_streamed_text(
    client: Client, server: ChatServer, engine_gate: GateFactory
) -> None:
    """``stop`` ends the generation with ``cancelled``; the stored text is what streamed."""
    gate = engine_gate(server)
    chat = (await client.open("s"))["chat"]
    gate.hold(4)  # the prefill and three tokens; the reply cannot end before the stop arrives
    started = await client.start("s", "Count to a thousand", **LONG)
    first = await client.wait_for(lambda f: f["type"] == "token")
    await client.send({"type": "stop", "session": "s"})
    await client.request({"type": "ping"})  # frames are handled in order: the stop is in
    gate.release()
    reply = await client.finish("s", started)
    reply.tokens.insert(0, first)
    assert reply.done["reason"] == "cancelled"
    assert reply.done["usage"]["completion_tokens"] < LONG["max_tokens"]
    assert_contiguous(reply)
    await server.idle()
    messages = await stored_messages(client, chat)
    assert messages[-1]["status"] == "cancelled"
    assert messages[-1]["text"] == reply.text


async def test_stop_without_a_generation_does_nothing(client: Client) -> None:
    """``stop`` on an idle session sends nothing; the session keeps working."""
    await client.open("s")
    await client.send({"type": "stop", "session": "s"})
    assert (await client.request({"type": "ping"}))["type"] == "pong"
    assert [f["type"] for f in client.received][-1] == "pong"


async def test_close_cancels_before_closed(
    client: Client, server: ChatServer, engine_gate: GateFactory
) -> None:
    """``close`` cancels the running generation: its ``done`` comes before ``closed``."""
    gate = engine_gate(server)
    chat = (await client.open("s"))["chat"]
    gate.hold(4)  # the prefill and three tokens; the reply cannot end before the close arrives
    await client.start("s", "Write a long story", **LONG)
    await client.wait_for(lambda f: f["type"] == "token")
    await client.send({"type": "close", "session": "s", "id": "close"})
    await client.request({"type": "ping"})  # frames are handled in order: the close is in
    gate.release()
    closed = await client.wait_for(lambda f: f["type"] == "closed")
    assert closed == {"type": "closed", "session": "s", "id": "close"}
    kinds = [f["type"] for f in client.received if f.get("session") == "s"]
    assert kinds.index("done") < kinds.index("closed")
    done = next(f for f in client.received if f["type"] == "done")
    assert done["reason"] == "cancelled"
    await server.idle()
    assert (await stored_messages(client, chat))[-1]["status"] == "cancelled"
    again = await client.request({"type": "send", "session": "s", "text": "hi"})
    assert again["code"] == "unknown_session"


async def drop_mid_reply(server: ChatServer, engine_gate: GateFactory) -> tuple[str, Frame, Frame]:
    """A client starts a long reply, reads its first token and drops; the engine is held until
    the server has seen the drop, so the reply is cut, never finished. Returns the chat id, the
    ``started`` frame and the first token frame, once the cut reply is stored."""
    gate = engine_gate(server)
    first = await Client.connect(ws_url(server))
    await first.hello()
    chat = (await first.open("s"))["chat"]
    gate.hold(2)  # the prefill and one token; the reply cannot end before the drop is seen
    started = await first.start("s", "Write a long story", **LONG)
    token = await first.wait_for(lambda f: f["type"] == "token")
    await first.close()
    await server.wait_connections(0)
    gate.release()
    await server.idle()
    return chat, started, token


async def test_disconnect_cancels_and_keeps_the_partial_reply(
    server: ChatServer, engine_gate: GateFactory
) -> None:
    """A dropped connection cancels its generations; what was generated is stored."""
    chat, _, token = await drop_mid_reply(server, engine_gate)
    second = await Client.connect(ws_url(server))
    await second.hello()
    messages = await stored_messages(second, chat)
    assert messages[-1]["status"] == "cancelled"
    assert messages[-1]["text"].startswith(token["text"])
    await second.close()


async def test_send_while_generating_is_busy_and_leaves_it_running(
    client: Client, server: ChatServer, engine_gate: GateFactory
) -> None:
    """A second ``send`` gets ``busy``; the first generation completes untouched."""
    gate = engine_gate(server)
    await client.open("s")
    gate.hold(2)  # the prefill and one token; the reply cannot end before the second send arrives
    started = await client.start("s", "Hello", **GREEDY, max_tokens=30)
    busy = await client.request({"type": "send", "session": "s", "text": "again"})
    gate.release()
    assert busy["code"] == "busy"
    assert busy["session"] == "s"
    reply = await client.finish("s", started)
    assert reply.done["reason"] in ("stop", "length")
    assert_contiguous(reply)


async def test_resume_after_reconnect_reuses_the_resident_cache(server: ChatServer) -> None:
    """Reopening a chat on a new connection returns its history and the next turn hits the cache."""
    first = await Client.connect(ws_url(server))
    await first.hello()
    chat = (await first.open("s", system="You are terse."))["chat"]
    reply = await first.chat("s", "Hi there", **GREEDY, max_tokens=20)
    await first.close()
    await server.idle()
    for engine in server.models.loaded():
        await engine.wait_idle()  # the reply's positions are settled: exact for reuse

    second = await Client.connect(ws_url(server))
    await second.hello()
    opened = await second.open("t", chat=chat)
    assert [(m["role"], m["text"]) for m in opened["messages"]] == [
        ("system", "You are terse."),
        ("user", "Hi there"),
        ("assistant", reply.text),
    ]
    nxt = await second.chat("t", "And then?", **GREEDY, max_tokens=10)
    # all but the reply's last token, which was sampled and never fed to the model
    settled = reply.done["usage"]["prompt_tokens"] + reply.done["usage"]["completion_tokens"] - 1
    assert nxt.started["cached_tokens"] == settled
    assert nxt.done["usage"]["cached_tokens"] == settled
    await second.close()


async def test_cold_restart_continues_exactly_like_a_cached_twin(start_service: ServiceFactory) -> None:
    """After a restart, a chat re-prefilled from stored ids continues as its cached twin does."""
    turns = ["Name three colours.", "Now three animals."]
    async with start_service() as server:
        c = await Client.connect(ws_url(server))
        await c.hello()
        twin = (await c.open("twin"))["chat"]
        cold = (await c.open("cold"))["chat"]
        twin_first = await c.chat("twin", turns[0], **GREEDY, max_tokens=24)
        await c.chat("cold", turns[0], **GREEDY, max_tokens=24)
        for engine in server.models.loaded():
            await engine.wait_idle()  # the replies' positions are settled: exact for reuse
        cached = await c.chat("twin", turns[1], **GREEDY, max_tokens=24)
        usage = twin_first.done["usage"]
        assert cached.started["cached_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] - 1
        await c.close()
    async with start_service() as server:
        c = await Client.connect(ws_url(server))
        await c.hello()
        await c.open("cold", chat=cold)
        recomputed = await c.chat("cold", turns[1], **GREEDY, max_tokens=24)
        await c.close()
    assert recomputed.started["cached_tokens"] == 0
    assert recomputed.started["prompt_tokens"] == cached.started["prompt_tokens"]
    assert recomputed.text == cached.text
    assert recomputed.done["usage"]["completion_tokens"] == cached.done["usage"]["completion_tokens"]
    assert twin != cold


async def test_user_message_is_stored_before_generation_starts(
    client: Client, server: ChatServer, engine_gate: GateFactory
) -> None:
    """While a reply streams, history already holds the user message (and not the unfinished reply)."""
    gate = engine_gate(server)
    chat = (await client.open("s"))["chat"]
    gate.hold(2)  # the prefill and one token, then the reply waits mid-stream
    await client.start("s", "Remember me", **LONG)
    await client.wait_for(lambda f: f["type"] == "token")
    other = await Client.connect(ws_url(server))
    await other.hello()
    messages = await stored_messages(other, chat)
    assert [(m["role"], m["text"]) for m in messages] == [("user", "Remember me")]
    await other.close()
    await client.send({"type": "stop", "session": "s"})
    gate.release()
    await client.wait_for(lambda f: f["type"] == "done")


async def test_chats_history_and_delete(client: Client, server: ChatServer) -> None:
    """``chats`` lists newest first; ``history`` pages; ``delete`` removes the chat for good."""
    ids = []
    for name in ("one", "two"):
        ids.append((await client.open(name, title=f"chat {name}"))["chat"])
        await client.chat(name, f"hello {name}", **GREEDY, max_tokens=5)
    await server.idle()
    listed = await client.request({"type": "chats"})
    assert [c["chat"] for c in listed["chats"]][:2] == [ids[1], ids[0]]
    assert listed["chats"][0]["title"] == "chat two"
    assert listed["chats"][0]["messages"] == 2
    page = await client.request({"type": "chats", "limit": 1, "before": ids[1]})
    assert [c["chat"] for c in page["chats"]] == [ids[0]]
    last = await client.request({"type": "history", "chat": ids[0], "limit": 1})
    assert [m["role"] for m in last["messages"]] == ["assistant"]
    older = await client.request({"type": "history", "chat": ids[0], "before": last["messages"][0]["id"]})
    assert [m["role"] for m in older["messages"]] == ["user"]
    for unknown in (str(uuid.uuid4()), "not-a-message-id"):  # a chat's pages, like the chat list's, end empty
        page = await client.request({"type": "history", "chat": ids[0], "before": unknown})
        assert page["type"] == "history", page
        assert page["messages"] == []
        listed_before = await client.request({"type": "chats", "before": unknown})
        assert listed_before["chats"] == []
    deleted = await client.request({"type": "delete", "chat": ids[0]})
    assert deleted["type"] == "deleted"
    assert deleted["chat"] == ids[0]
    gone = await client.request({"type": "history", "chat": ids[0]})
    assert gone["code"] == "not_found"
    again = await client.request({"type": "delete", "chat": ids[0]})
    assert again["code"] == "not_found"


async def test_models_and_ping(client: Client, server: ChatServer) -> None:
    """``models`` lists the loaded default (a chat model); ``ping`` gets ``pong`` with the id echoed."""
    models = await client.request({"type": "models"})
    assert models["models"] == [
        {"id": server.models.default_id, "context_length": 256, "loaded": True, "default": True, "chat": True}
    ]
    pong = await client.request({"type": "ping"})
    assert pong["type"] == "pong"


async def test_reattach_within_the_grace_period_replays_then_streams(
    start_service: ServiceFactory, engine_gate: GateFactory
) -> None:
    """With a grace period, reopening with ``resume`` replays missed tokens, then goes on live;
    the whole text arrives exactly once and matches the stored reply."""
    async with start_service(disconnect_grace_s=60) as server:
        gate = engine_gate(server)
        first = await Client.connect(ws_url(server))
        await first.hello()
        chat = (await first.open("s"))["chat"]
        gate.hold(8)  # the prefill and seven tokens, then the reply waits until the resume
        started = await first.start("s", "Write a long story", **LONG)
        seen = [await first.wait_for(lambda f: f["type"] == "token")]
        while sum(t.get("tokens", 1) for t in seen) < 3:  # frames may carry several tokens
            seen.append(await first.wait_for(lambda f: f["type"] == "token"))
        await first.close()

        second = await Client.connect(ws_url(server))
        await second.hello()
        next_index = seen[-1]["index"] + seen[-1].get("tokens", 1)
        opened = await second.open(
            "t", chat=chat, resume={"message": started["message"], "index": next_index}
        )
        assert [m["role"] for m in opened["messages"]] == ["user"]
        gate.release()
        rest = await second.finish("t", started)
        assert rest.tokens[0]["index"] == next_index
        await server.idle()
        stored = (await stored_messages(second, chat))[-1]
        assert stored["text"] == "".join(t["text"] for t in seen) + rest.text
        assert stored["id"] == rest.done["message"] == started["message"]
        assert rest.done["reason"] == "length"
        assert (
            next_index + sum(t.get("tokens", 1) for t in rest.tokens)
            == rest.done["usage"]["completion_tokens"]
        )
        await second.close()


async def test_without_grace_a_resume_finds_the_stored_partial_reply(
    server: ChatServer, engine_gate: GateFactory
) -> None:
    """With the default grace of 0 a dropped generation is cancelled; ``resume`` just reopens."""
    chat, started, _ = await drop_mid_reply(server, engine_gate)
    second = await Client.connect(ws_url(server))
    await second.hello()
    opened = await second.open("t", chat=chat, resume={"message": started["message"], "index": 0})
    assert [(m["role"], m["status"]) for m in opened["messages"]] == [
        ("user", "complete"),
        ("assistant", "cancelled"),
    ]
    assert (await second.request({"type": "ping"}))["type"] == "pong"
    assert not [f for f in second.received if f["type"] == "token"]
    await second.close()


async def test_sessions_pick_models_each_loaded_once(
    service_settings: ServiceSettings, tiny_model: PreparedModel, tmp_path: Path
) -> None:
    """``models`` lists every configured model; ``open`` with ``model`` loads it on first use
    and later sessions share that engine."""
    second_dir = tmp_path / "tiny-copy"
    shutil.copytree(tiny_model.directory, second_dir)
    settings = dataclasses.replace(service_settings, models=(str(tiny_model.directory), str(second_dir)))
    async with running_service(settings) as server:
        c = await Client.connect(ws_url(server))
        welcome = await c.hello()
        listed = {m["id"]: (m["loaded"], m["default"]) for m in welcome["models"]}
        assert listed == {tiny_model.directory.name: (True, True), "tiny-copy": (False, False)}
        for session in ("a", "b"):
            opened = await c.open(session, model="tiny-copy")
            assert opened["model"] == "tiny-copy"
        reply = await c.chat("a", "hi", **GREEDY, max_tokens=4)
        assert reply.done["reason"] in ("stop", "length")
        models = await c.request({"type": "models"})
        assert {m["id"]: m["loaded"] for m in models["models"]} == {
            tiny_model.directory.name: True,
            "tiny-copy": True,
        }
        assert len(server.models.loaded()) == 2
        await c.close()


async def test_a_failing_model_run_ends_that_generation_not_the_server(
    client: Client, server: ChatServer
) -> None:
    """A model run that raises ends its generation with ``done`` reason ``error`` (stored as
    ``error``); the session and the server go on."""
    engine = await server.models.engine(server.models.default_id)
    real_forward = engine.runner.forward
    failures = []

    def failing_forward(*args: object, **kwargs: object) -> object:
        if not failures:
            failures.append(True)
            raise RuntimeError("injected fault")
        return real_forward(*args, **kwargs)  # type: ignore[arg-type]

    chat = (await client.open("s"))["chat"]
    engine.runner.forward = failing_forward  # type: ignore[method-assign]
    try:
        failed = await client.chat("s", "hello", **GREEDY, max_tokens=5)
    finally:
        engine.runner.forward = real_forward  # type: ignore[method-assign]
    assert failed.done["reason"] == "error"
    assert failed.done["error"]["code"] == "internal"
    assert "injected fault" in failed.done["error"]["message"]
    await server.idle()
    assert (await stored_messages(client, chat))[-1]["status"] == "error"
    again = await client.chat("s", "hello again", **GREEDY, max_tokens=5)
    assert again.done["reason"] in ("stop", "length")


async def test_fields_a_client_leaves_out_take_the_models_sampling_defaults(
    client: Client, server: ChatServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No params: the model's defaults; params on open or send override them field by field."""
    model_defaults = SamplingDefaults(temperature=0.0, top_k=7, repetition_penalty=1.25, source="test")
    monkeypatch.setattr(server.models, "sampling_defaults", lambda model_id: model_defaults)
    engine = await server.models.engine(server.models.default_id)
    seen: list[SamplingParams] = []
    submit = engine.submit

    def recording(
        chat: ChatKey, prompt: list[int], params: SamplingParams, *, turn_stops: tuple[str, ...] = ()
    ) -> GenerationStream:
        seen.append(params)
        return submit(chat, prompt, params, turn_stops=turn_stops)

    monkeypatch.setattr(engine, "submit", recording)
    await client.open("a")
    await client.finish("a", await client.start("a", "Hello", max_tokens=2))
    await client.finish("a", await client.start("a", "Again", temperature=0.5, max_tokens=2))
    await client.open("b", params={"repetition_penalty": 1.0})
    await client.finish("b", await client.start("b", "Hi", max_tokens=2))

    got = [(p.temperature, p.top_k, p.repetition_penalty) for p in seen]
    assert got == [(0.0, 7, 1.25), (0.5, 7, 1.25), (0.0, 7, 1.0)]
