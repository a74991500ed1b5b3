"""KV reuse across chats over ``chat.v1``: a user's new chat starts from another chat's cache
of the same user, never another user's."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from service.engine.models.registry import PreparedModel
from service.engine.prefix_index import common_prefix
from service.engine.tokenizer import ChatMessage, ChatTokenizer
from service.server import ChatServer
from tests.service.conftest import ServiceFactory
from tests.service.test_auth import add_user, connect
from tests.service.test_http import scrape

GREEDY = {"temperature": 0, "max_tokens": 16}
SYSTEM = (
    "You are the assistant of a small bakery. Answer questions about bread, cakes, opening "
    "hours and orders in short, friendly sentences, and say so when you do not know."
)
FIRST, SECOND = "What is sourdough?", "When do you open on Sundays?"


@pytest.fixture
async def token_server(start_service: ServiceFactory) -> AsyncIterator[ChatServer]:
    async with start_service(auth="token") as server:
        yield server


def first_turn_ids(tokenizer: ChatTokenizer, text: str) -> list[int]:
    """The prompt ids the service builds for a chat's first turn."""
    messages: list[ChatMessage] = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]
    return tokenizer.next_turn_ids([], messages)


async def settled(server: ChatServer) -> None:
    """Every model's engine is idle and its finished caches are exact for reuse."""
    await server.idle()
    for engine in server.models.loaded():
        await engine.wait_idle()


async def test_a_users_new_chat_reuses_the_system_prompt_of_another_and_no_other_user_does(
    token_server: ChatServer, tiny_model: PreparedModel
) -> None:
    """Alice's second chat (on another connection) reports exactly the shared prefix as cached in
    ``started`` and ``done``; Bob, sending the very same prompt, reuses nothing and gets the same
    greedy reply computed from scratch."""
    tokenizer = ChatTokenizer.from_dir(tiny_model.directory)
    first_ids, second_ids = first_turn_ids(tokenizer, FIRST), first_turn_ids(tokenizer, SECOND)
    shared = common_prefix(first_ids, second_ids, len(second_ids))
    assert shared >= len(tokenizer.encode(SYSTEM))
    _, alice_token = await add_user(token_server, "alice")
    _, bob_token = await add_user(token_server, "bob")

    alice = await connect(token_server, alice_token)
    await alice.open("a", system=SYSTEM)
    first = await alice.chat("a", FIRST, **GREEDY)
    assert first.started["cached_tokens"] == 0
    assert first.started["prompt_tokens"] == len(first_ids)
    await settled(token_server)

    again = await connect(token_server, alice_token)
    await again.open("b", system=SYSTEM)
    reused = await again.chat("b", SECOND, **GREEDY)
    assert reused.started["prompt_tokens"] == len(second_ids)
    assert reused.started["cached_tokens"] == shared
    assert reused.done["usage"]["cached_tokens"] == shared
    await settled(token_server)
    assert (await scrape(token_server))['localchat_prompt_tokens_reused_total{how="shared"}'] == shared

    bob = await connect(token_server, bob_token)
    await bob.open("b", system=SYSTEM)
    theirs = await bob.chat("b", SECOND, **GREEDY)
    assert theirs.started["cached_tokens"] == 0
    assert theirs.done["usage"]["cached_tokens"] == 0
    assert theirs.text == reused.text
    assert theirs.done["usage"]["completion_tokens"] == reused.done["usage"]["completion_tokens"]
    assert (await scrape(token_server))['localchat_prompt_tokens_reused_total{how="shared"}'] == shared
    for client in (alice, again, bob):
        await client.close()
