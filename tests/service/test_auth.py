"""``--auth token`` end to end, and isolation between two users across every frame that names a chat."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from service.protocol.errors import CloseCode
from service.server import ChatServer
from service.store.records import LOCAL_USER_NAME, User, token_hash
from tests.engine_gate import GateFactory
from tests.service.client import Client, Frame
from tests.service.conftest import ServiceFactory, ws_url
from tests.service.test_errors import expect_close

GREEDY = {"temperature": 0, "max_tokens": 8}
LONG = {"temperature": 0, "max_tokens": 200}


async def add_user(server: ChatServer, name: str) -> tuple[User, str]:
    """A user with a fresh token, made the way ``users add`` makes one."""
    token = secrets.token_urlsafe(32)
    return await server.store.add_user(name, token_hash(token)), token


async def connect(server: ChatServer, token: str | None) -> Client:
    client = await Client.connect(ws_url(server))
    await client.hello(**({} if token is None else {"token": token}))
    return client


async def refused(server: ChatServer, **hello: Any) -> tuple[Frame, int]:
    """The reply to a ``hello`` that should be refused, and the close code that follows it."""
    client = await Client.connect(ws_url(server))
    reply = await client.request({"type": "hello", **hello})
    return reply, await expect_close(client)


def assert_unauthenticated(reply: Frame, code: int) -> None:
    assert reply["type"] == "error", reply
    assert reply["code"] == "unauthenticated", reply
    assert code == CloseCode.UNAUTHENTICATED


@pytest.fixture
async def token_server(start_service: ServiceFactory) -> AsyncIterator[ChatServer]:
    async with start_service(auth="token", disconnect_grace_s=60) as server:
        yield server


# ---- tokens ------------------------------------------------------------------------------------


async def test_hello_without_a_token_is_refused_with_4401(token_server: ChatServer) -> None:
    """With ``--auth token`` a hello that carries no token gets ``unauthenticated``, then close 4401."""
    assert_unauthenticated(*await refused(token_server))


async def test_hello_with_an_unknown_token_is_refused_with_4401(token_server: ChatServer) -> None:
    """A token nobody holds (or an empty one) is refused like a missing one."""
    await add_user(token_server, "alice")
    assert_unauthenticated(*await refused(token_server, token=secrets.token_urlsafe(32)))
    assert_unauthenticated(*await refused(token_server, token=""))


async def test_a_valid_token_is_welcomed_as_its_user(token_server: ChatServer) -> None:
    """A user's token gets ``welcome`` carrying that user's id and name."""
    alice, token = await add_user(token_server, "alice")
    client = await Client.connect(ws_url(token_server))
    welcome = await client.hello(token=token)
    assert welcome["user"] == {"id": str(alice.id), "name": "alice"}
    assert (await client.request({"type": "ping"}))["type"] == "pong"
    await client.close()


async def test_a_revoked_token_is_refused_with_4401(token_server: ChatServer) -> None:
    """After ``revoke`` the same token that was welcomed before is refused."""
    _, token = await add_user(token_server, "alice")
    await (await connect(token_server, token)).close()
    assert await token_server.store.revoke_user("alice")
    assert_unauthenticated(*await refused(token_server, token=token))


async def test_a_reissued_token_replaces_the_revoked_one_and_keeps_the_chats(
    token_server: ChatServer,
) -> None:
    """Adding a revoked user again: the old token stays refused, the new one is the same account."""
    alice, old = await add_user(token_server, "alice")
    client = await connect(token_server, old)
    chat = (await client.open("s"))["chat"]
    await client.close()
    assert await token_server.store.revoke_user("alice")
    again, new = await add_user(token_server, "alice")
    assert again.id == alice.id
    assert_unauthenticated(*await refused(token_server, token=old))
    client = await connect(token_server, new)
    assert [c["chat"] for c in (await client.request({"type": "chats"}))["chats"]] == [chat]
    await client.close()


async def test_the_local_user_cannot_log_in_with_a_token(token_server: ChatServer) -> None:
    """The ``--auth none`` user is not usable in token mode, even if its row were given a token."""
    _, token = await add_user(token_server, LOCAL_USER_NAME)  # the CLI refuses this; the store must too
    assert await token_server.store.user_for_token(token) is None
    assert_unauthenticated(*await refused(token_server, token=token))


# ---- isolation ---------------------------------------------------------------------------------


@dataclass
class TwoUsers:
    server: ChatServer
    alice: Client
    bob: Client
    alice_chat: str
    bob_chat: str
    alice_user: User
    alice_token: str

    async def alice_state(self) -> tuple[Frame, Frame]:
        """Alice's chat list and her chat's history, ids stripped, to compare before and after."""
        chats = await self.alice.request({"type": "chats"})
        history = await self.alice.request({"type": "history", "chat": self.alice_chat})
        return _without_id(chats), _without_id(history)


def _without_id(frame: Frame) -> Frame:
    return {k: v for k, v in frame.items() if k != "id"}


@pytest.fixture
async def two_users(token_server: ChatServer) -> AsyncIterator[TwoUsers]:
    """Alice and Bob connected with their own tokens, each with one chat of one finished turn."""
    alice_user, alice_token = await add_user(token_server, "alice")
    _, bob_token = await add_user(token_server, "bob")
    alice, bob = await connect(token_server, alice_token), await connect(token_server, bob_token)
    alice_chat = (await alice.open("s", title="alice's"))["chat"]
    await alice.chat("s", "My secret is 1234", **GREEDY)
    bob_chat = (await bob.open("s", title="bob's"))["chat"]
    await bob.chat("s", "Hello", **GREEDY)
    await token_server.idle()
    users = TwoUsers(token_server, alice, bob, alice_chat, bob_chat, alice_user, alice_token)
    yield users
    await users.alice.close()
    await users.bob.close()


async def assert_like_missing(client: Client, frame: Frame, foreign: str, *, key: str = "chat") -> None:
    """``frame`` naming the other user's chat gets exactly the error that a random id gets."""
    missing = await client.request({**frame, key: str(uuid.uuid4())})
    other = await client.request({**frame, key: foreign})
    assert other["type"] == "error", other
    assert other["code"] == "not_found", other
    assert _without_id(other) == _without_id(missing)


async def test_open_of_another_users_chat_is_not_found(two_users: TwoUsers) -> None:
    """``open`` with the other user's chat id is ``not_found``, word for word like a missing chat."""
    before = await two_users.alice_state()
    await assert_like_missing(two_users.bob, {"type": "open", "session": "x"}, two_users.alice_chat)
    assert "x" not in [f.get("session") for f in two_users.bob.received if f["type"] == "opened"]
    assert await two_users.alice_state() == before


async def test_history_of_another_users_chat_is_not_found(two_users: TwoUsers) -> None:
    """``history`` of the other user's chat is ``not_found``, like a missing chat."""
    before = await two_users.alice_state()
    await assert_like_missing(two_users.bob, {"type": "history", "limit": 10}, two_users.alice_chat)
    assert await two_users.alice_state() == before


async def test_delete_of_another_users_chat_is_not_found_and_deletes_nothing(two_users: TwoUsers) -> None:
    """``delete`` of the other user's chat is ``not_found``, and the chat and its history stay."""
    before = await two_users.alice_state()
    await assert_like_missing(two_users.bob, {"type": "delete"}, two_users.alice_chat)
    assert await two_users.alice_state() == before
    _, history = before
    assert [m["role"] for m in history["messages"]] == ["user", "assistant"]


async def test_chats_lists_only_the_callers_own(two_users: TwoUsers) -> None:
    """``chats`` lists the caller's chats only; paging from the other's chat id gives an empty page."""
    bob_chats = await two_users.bob.request({"type": "chats"})
    alice_chats = await two_users.alice.request({"type": "chats"})
    assert [c["chat"] for c in bob_chats["chats"]] == [two_users.bob_chat]
    assert [c["chat"] for c in alice_chats["chats"]] == [two_users.alice_chat]
    paged = await two_users.bob.request({"type": "chats", "before": two_users.alice_chat})
    assert paged["chats"] == []


async def test_history_paging_from_another_users_message_reveals_nothing(two_users: TwoUsers) -> None:
    """``history`` of one's own chat ``before`` the other user's message id returns no messages."""
    _, history = await two_users.alice_state()
    alice_message = history["messages"][0]["id"]
    page = await two_users.bob.request(
        {"type": "history", "chat": two_users.bob_chat, "before": alice_message}
    )
    assert page["type"] == "history", page
    assert page["messages"] == []


async def test_resume_of_another_users_running_message_is_refused(
    two_users: TwoUsers, engine_gate: GateFactory
) -> None:
    """``open`` with ``resume`` naming the other user's running message never attaches to it:
    in their chat it is ``not_found``; in one's own chat nothing is replayed; the owner still can."""
    users = two_users
    gate = engine_gate(users.server)
    gate.hold(3)  # the prefill and two tokens, then the reply waits: it is still running throughout
    started = await users.alice.start("s", "Write a long story", **LONG)
    await users.alice.wait_for(lambda f: f["type"] == "token")
    await users.alice.close()  # detached, kept running for the grace period
    resume = {"message": started["message"], "index": 0}

    await assert_like_missing(users.bob, {"type": "open", "session": "x", "resume": resume}, users.alice_chat)
    await users.bob.open("y", chat=users.bob_chat, resume=resume)
    assert (await users.bob.request({"type": "ping"}))["type"] == "pong"
    assert not [f for f in users.bob.received if f.get("session") == "y" and f["type"] in ("token", "done")]
    running = users.server.detached_generation(
        started["message"], users.alice_user.id, uuid.UUID(users.alice_chat)
    )
    assert running is not None  # still running, unclaimed: bob's attempts came while it ran

    users.alice = await connect(users.server, users.alice_token)
    opened = await users.alice.open("t", chat=users.alice_chat, resume=resume)
    gate.release()
    reply = await users.alice.finish("t", opened)
    assert reply.tokens[0]["index"] == 0
    assert reply.done["message"] == started["message"]
    assert reply.done["reason"] == "length"
    await users.server.idle()
    stored = (await users.alice.request({"type": "history", "chat": users.alice_chat}))["messages"][-1]
    assert stored["text"] == reply.text
    assert not [f for f in users.bob.received if f.get("session") == "y" and f["type"] in ("token", "done")]


async def test_identical_chats_of_two_users_never_share_a_kv_cache(token_server: ChatServer) -> None:
    """Two users typing the same text: the second user's first turn reuses no cached tokens."""
    _, alice_token = await add_user(token_server, "alice")
    _, bob_token = await add_user(token_server, "bob")
    alice, bob = await connect(token_server, alice_token), await connect(token_server, bob_token)
    await alice.open("s", system="You are terse.")
    first = await alice.chat("s", "Tell me a story", **GREEDY)
    assert first.started["cached_tokens"] == 0
    for engine in token_server.models.loaded():
        await engine.wait_idle()  # the reply's positions are settled: exact for reuse
    second = await alice.chat("s", "Another one", **GREEDY)
    usage = first.done["usage"]
    # the cache is live (all but the reply's last token, sampled and never fed): reuse is possible
    assert second.started["cached_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] - 1

    await bob.open("s", system="You are terse.")
    theirs = await bob.chat("s", "Tell me a story", **GREEDY)
    assert theirs.started["cached_tokens"] == 0
    assert theirs.done["usage"]["cached_tokens"] == 0
    assert theirs.started["prompt_tokens"] == first.started["prompt_tokens"]
    assert theirs.text == first.text  # same text, computed from scratch, same greedy reply
    await alice.close()
    await bob.close()
