"""Every error code and close code of the contract, produced where it applies."""

from __future__ import annotations

import pytest
from websockets.exceptions import ConnectionClosed

from service.server import ChatServer
from tests.service.client import Client
from tests.service.conftest import ServiceFactory, ws_url


async def test_frames_before_hello_are_refused(server: ChatServer) -> None:
    """Anything but ``hello`` first gets ``unauthenticated``; the connection stays open."""
    c = await Client.connect(ws_url(server))
    refused = await c.request({"type": "open", "session": "s"})
    assert refused["code"] == "unauthenticated"
    welcome = await c.hello()
    assert welcome["protocol"] == "chat.v1"
    assert welcome["user"]["name"] == "local"
    assert welcome["limits"]["max_sessions"] == 16
    await c.close()


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("this is not json", "bad_frame"),
        ("[1, 2]", "bad_frame"),
        ('{"id": 1}', "bad_frame"),
        ('{"type": "open", "id": 7}', "bad_frame"),
        ('{"type": "open", "session": "", "id": 7}', "bad_frame"),
        ('{"type": "send", "session": "s", "id": 7}', "bad_frame"),
        ('{"type": "teleport", "id": 7}', "unknown_type"),
    ],
)
async def test_malformed_frames_get_errors(client: Client, raw: str, code: str) -> None:
    """Malformed frames get the right code (with the id when readable); the connection lives on."""
    await client.send_raw(raw)
    error = await client.wait_for(lambda f: f["type"] == "error")
    assert error["code"] == code
    if '"id": 7' in raw:
        assert error["id"] == 7
    assert (await client.request({"type": "ping"}))["type"] == "pong"


async def test_session_errors(client: Client) -> None:
    """unknown_session, session_exists, bad_params, not_found and model_unavailable."""
    assert (await client.request({"type": "send", "session": "nope", "text": "x"}))[
        "code"
    ] == "unknown_session"
    assert (await client.request({"type": "stop", "session": "nope"}))["code"] == "unknown_session"
    assert (await client.request({"type": "close", "session": "nope"}))["code"] == "unknown_session"
    await client.open("s")
    assert (await client.request({"type": "open", "session": "s"}))["code"] == "session_exists"
    for params in (
        {"temperature": -1},
        {"max_tokens": 0},
        {"top_p": 2},
        {"max_tokens": 10**6},
        {"top_k": "x"},
    ):
        error = await client.request({"type": "send", "session": "s", "text": "x", "params": params})
        assert (error["code"], error["session"]) == ("bad_params", "s"), params
    bad_open = await client.request({"type": "open", "session": "t", "params": {"temperature": 99}})
    assert bad_open["code"] == "bad_params"
    missing = "00000000-0000-0000-0000-000000000000"
    for frame in (
        {"type": "open", "session": "u", "chat": missing},
        {"type": "open", "session": "u", "chat": "not-a-uuid"},
        {"type": "history", "chat": missing},
        {"type": "delete", "chat": "not-a-uuid"},
    ):
        assert (await client.request(frame))["code"] == "not_found", frame
    unavailable = await client.request({"type": "open", "session": "u", "model": "no-such-model"})
    assert unavailable["code"] == "model_unavailable"


async def test_session_limit(start_service: ServiceFactory) -> None:
    """Past ``max_sessions`` an ``open`` gets ``limit``; closing one frees a place."""
    async with start_service(max_sessions=2) as server:
        c = await Client.connect(ws_url(server))
        await c.hello()
        await c.open("a")
        await c.open("b")
        assert (await c.request({"type": "open", "session": "c"}))["code"] == "limit"
        await c.request({"type": "close", "session": "a"})
        await c.open("c")
        await c.close()


async def test_prompt_longer_than_the_context_is_limit(client: Client) -> None:
    """A prompt that cannot fit the model's context gets ``limit`` and nothing starts."""
    await client.open("s")
    error = await client.request({"type": "send", "session": "s", "text": "word " * 400})
    assert error["code"] == "limit"
    reply = await client.chat("s", "short", temperature=0, max_tokens=3)
    assert reply.done["usage"]["prompt_tokens"] < 40


async def test_full_queue_is_overloaded(start_service: ServiceFactory) -> None:
    """When the engine's queue is full, ``send`` gets ``overloaded``."""
    async with start_service(engine={"max_waiting": 0}) as server:
        c = await Client.connect(ws_url(server))
        await c.hello()
        await c.open("s")
        assert (await c.request({"type": "send", "session": "s", "text": "x"}))["code"] == "overloaded"
        await c.close()


async def expect_close(client: Client) -> int:
    with pytest.raises(ConnectionClosed) as closed:
        await client.wait_for(lambda f: False)
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code


async def test_binary_frame_closes_1003(client: Client) -> None:
    """A binary frame closes the connection with 1003."""
    await client.send_raw(b"\x00\x01")
    assert await expect_close(client) == 1003


async def test_oversized_frame_closes_1009(client: Client) -> None:
    """A frame over 64 KiB closes the connection with 1009."""
    await client.send_raw("x" * (64 * 1024 + 1))
    assert await expect_close(client) == 1009


async def test_no_hello_in_time_closes_4408(start_service: ServiceFactory) -> None:
    """Without ``hello`` within the timeout the server closes with 4408."""
    async with start_service(hello_timeout_s=0.2) as server:
        c = await Client.connect(ws_url(server))
        assert await expect_close(c) == 4408


async def test_client_without_subprotocol_is_served(server: ChatServer) -> None:
    """A client that offers no subprotocol still gets served."""
    c = await Client.connect(ws_url(server), subprotocols=None)
    assert c.ws.subprotocol is None
    await c.hello()
    await c.close()
