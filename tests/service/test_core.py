"""The chat core as every transport sees it: the engine alone admits a turn, and a refused
turn leaves no trace in the history."""

from __future__ import annotations

from service.server import ChatServer
from tests.service.client import Client
from tests.service.conftest import ServiceFactory, ws_url


async def _history(client: Client, chat: str) -> list[str]:
    reply = await client.request({"type": "history", "chat": chat})
    return [m["role"] for m in reply["messages"]]


async def test_a_turn_the_engine_refuses_is_not_stored(start_service: ServiceFactory) -> None:
    """A full queue refuses the turn (``overloaded``): neither the user's message nor a reply is
    stored, and nothing is left running."""
    async with start_service(engine={"max_waiting": 0}) as server:
        client = await Client.connect(ws_url(server))
        await client.hello()
        chat = (await client.open("s"))["chat"]
        assert (await client.request({"type": "send", "session": "s", "text": "x"}))["code"] == "overloaded"
        assert await _history(client, chat) == []
        assert server.generation_count == 0
        await client.close()


async def test_a_prompt_too_long_is_refused_and_the_chat_goes_on(server: ChatServer, client: Client) -> None:
    """A turn that does not fit the context is ``limit`` and is not stored; the next turn of the
    same session is served as if it had never been sent."""
    chat = (await client.open("s"))["chat"]
    error = await client.request({"type": "send", "session": "s", "text": "word " * 400})
    assert error["code"] == "limit"
    assert await _history(client, chat) == []
    reply = await client.chat("s", "short", temperature=0, max_tokens=3)
    assert reply.done["usage"]["prompt_tokens"] < 40
    assert await _history(client, chat) == ["user", "assistant"]
