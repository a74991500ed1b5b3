"""Browsers from elsewhere, connection limits and clients that stop reading."""

from __future__ import annotations

import asyncio
import socket

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from service.access import AccessPolicy
from service.server import ChatServer
from tests.engine_gate import GateFactory
from tests.service.client import TIMEOUT_S, Client
from tests.service.conftest import ServiceFactory, ws_url

LONG = {"temperature": 0, "max_tokens": 200}


async def refused_status(url: str, **kwargs: object) -> int:
    with pytest.raises(InvalidStatus) as refused:
        await connect(url, open_timeout=TIMEOUT_S, **kwargs)  # type: ignore[arg-type]
    return refused.value.response.status_code


async def test_foreign_origin_is_refused(server: ChatServer) -> None:
    """A page from another site (or another local port) cannot open the WebSocket: 403."""
    assert await refused_status(ws_url(server), origin="https://evil.example") == 403
    assert await refused_status(ws_url(server), origin="http://localhost:3000") == 403
    own = await connect(ws_url(server), origin=f"http://localhost:{server.port}")  # type: ignore[arg-type]
    await own.close()
    same_ip = await connect(ws_url(server), origin=f"http://127.0.0.1:{server.port}")  # type: ignore[arg-type]
    await same_ip.close()


async def test_configured_origin_is_accepted(start_service: ServiceFactory) -> None:
    """An ``--allowed-origin`` is accepted."""
    async with start_service(allowed_origins=("https://chat.example",)) as server:
        ws = await connect(ws_url(server), origin="https://chat.example")  # type: ignore[arg-type]
        await ws.close()


async def test_foreign_host_is_refused(server: ChatServer) -> None:
    """A request naming another host (DNS rebinding) is refused with 403, page and socket alike."""

    def status(path: str, host: str) -> int:
        upgrade = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT_S) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{upgrade}{key}\r\n".encode())
            return int(sock.recv(1024).split()[1])

    for path in ("/", "/ws", "/metrics"):
        assert await asyncio.to_thread(status, path, f"rebound.example:{server.port}") == 403, path
    assert await asyncio.to_thread(status, "/ws", f"127.0.0.1:{server.port}") == 101


def test_access_policy_names() -> None:
    """IP literals, localhost, the bound host and configured names pass; other names do not."""
    policy = AccessPolicy.build(host="0.0.0.0", allowed_hosts=("chat.lan",), allowed_origins=())
    for host in ("127.0.0.1:8765", "[::1]:8765", "localhost", "LOCALHOST:1", "chat.lan:8765", "10.0.0.7"):
        assert policy.host_allowed(host), host
    for host in ("evil.example", "localhost.evil.example:8765", "", None, "bad:port:x"):
        assert not policy.host_allowed(host), host
    assert policy.origin_allowed(None, 8765)
    assert policy.origin_allowed("http://chat.lan:8765", 8765)
    assert not policy.origin_allowed("http://chat.lan:8000", 8765)
    assert not policy.origin_allowed("null", 8765)


async def test_connection_limit_refuses_with_503(start_service: ServiceFactory) -> None:
    """Past ``max_connections`` the handshake gets 503; a freed place is usable again."""
    async with start_service(max_connections=1) as server:
        first = await Client.connect(ws_url(server))
        assert await refused_status(ws_url(server)) == 503
        await first.close()
        await server.wait_connections(0)
        second = await Client.connect(ws_url(server))
        await second.close()


async def test_unread_replies_are_bounded(start_service: ServiceFactory) -> None:
    """A client that sends requests but reads nothing is dropped (1008) before its replies pile up."""
    async with start_service(max_queued_frames=8) as server:
        ws = await connect(ws_url(server), max_queue=1)
        ws.transport.pause_reading()
        await ws.send('{"type": "hello"}')
        for _ in range(2000):
            try:
                await ws.send('{"type": "ping"}')
            except Exception:
                break
        await server.wait_connections(0)
        ws.transport.resume_reading()
        await ws.wait_closed()
        assert ws.close_code in (1008, 1006)


def slow_socket(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


def shrink_send_buffer(server: ChatServer) -> None:
    """Make the server's side of the only connection a slow link: a 4 KiB kernel buffer
    (loopback would otherwise absorb megabytes before anything blocks), and no user-space
    buffer above it (websockets lets its transport hold 32 KiB before a send waits)."""
    (connection,) = server.connections
    transport = connection.ws.transport
    transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    transport.set_write_buffer_limits(high=0)


async def test_a_stalled_reader_costs_one_frame_per_session_and_blocks_nobody(
    start_service: ServiceFactory, engine_gate: GateFactory
) -> None:
    """While one client reads nothing, another streams to the end; the stalled client's
    pending token text is coalesced (bounded frames) and arrives complete once it reads.

    16 sessions of 200 tokens make ~17 KB of text: more than the stalled link holds (~10 KB of
    kernel buffers) even when a busy server coalesced it all before sending anything.
    """
    async with start_service() as server:
        stalled = await connect(ws_url(server), sock=slow_socket(server.port), max_queue=1)
        stalled.transport.pause_reading()
        shrink_send_buffer(server)
        gate = engine_gate(server)
        gate.hold(0)  # until every session's generation is in: none may end before the last starts
        await stalled.send('{"type": "hello"}')
        sessions = [f"s{i}" for i in range(server.settings.server.max_sessions)]
        for name in sessions:
            await stalled.send(f'{{"type": "open", "session": "{name}"}}')
            await stalled.send(
                f'{{"type": "send", "session": "{name}", "text": "Write a long story",'
                ' "params": {"temperature": 0, "max_tokens": 200}}'
            )
        (stalled_connection,) = server.connections
        await asyncio.wait_for(server.wait_until(lambda: server.generation_count == len(sessions)), TIMEOUT_S)
        gate.release()

        fast = await Client.connect(ws_url(server))
        await fast.hello()
        await fast.open("f")
        reply = await fast.chat("f", "Write a long story", **LONG)
        assert reply.done["reason"] == "length"
        await server.idle()
        assert not stalled_connection.outbox.closed, "the stalled client was dropped early"
        queued = len(stalled_connection.outbox)
        # Per session at most its `started`, one coalesced token frame and its `done` wait.
        assert 0 < queued <= 3 * len(sessions), "expected a blocked writer holding coalesced frames"

        stalled.transport.resume_reading()
        texts: dict[str, str] = dict.fromkeys(sessions, "")
        done = 0
        while done < len(sessions):
            frame = orjson.loads(await asyncio.wait_for(stalled.recv(), TIMEOUT_S))
            if frame["type"] == "token":
                texts[frame["session"]] += frame["text"]
            done += frame["type"] == "done"
        for name in sessions:
            assert texts[name], name
        listing = await fast.request({"type": "chats"})
        stored = set()
        for chat in listing["chats"]:
            history = await fast.request({"type": "history", "chat": chat["chat"]})
            stored.add(history["messages"][-1]["text"])
        assert set(texts.values()) <= stored
        await stalled.close()
        await fast.close()


async def test_a_reader_stuck_past_the_send_timeout_is_dropped(start_service: ServiceFactory) -> None:
    """A client whose socket stays full past ``send_timeout_s`` is dropped; its replies are stored."""
    async with start_service(send_timeout_s=0.5) as server:
        stalled = await connect(ws_url(server), sock=slow_socket(server.port), max_queue=1)
        stalled.transport.pause_reading()
        shrink_send_buffer(server)
        await stalled.send('{"type": "hello"}')
        for i in range(8):
            await stalled.send(f'{{"type": "open", "session": "s{i}"}}')
            await stalled.send(
                f'{{"type": "send", "session": "s{i}", "text": "Write a long story",'
                ' "params": {"temperature": 0, "max_tokens": 200}}'
            )
        await asyncio.wait_for(server.wait_connections(0), TIMEOUT_S)
        await server.idle()
        listing = await Client.connect(ws_url(server))
        await listing.hello()
        chats = await listing.request({"type": "chats"})
        assert len(chats["chats"]) == 8
        assert all(c["messages"] == 2 for c in chats["chats"])
        await listing.close()
        stalled.transport.abort()
