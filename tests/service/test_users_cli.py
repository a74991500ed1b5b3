"""``python -m service users add|list|revoke`` as a real process against the test database."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest

from service.protocol.errors import CloseCode
from service.store.records import LOCAL_USER_NAME
from service.store.store import Store
from tests.engine_gate import GateFactory
from tests.service.client import TIMEOUT_S, Client
from tests.service.conftest import ServiceFactory, ws_url
from tests.service.test_errors import expect_close


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def token(self) -> str:
        """The last word of the last line printed."""
        return self.out.strip().splitlines()[-1].split()[-1]


async def users(*args: str, env: dict[str, str] | None = None) -> Result:
    """Run ``python -m service users ARGS`` to completion (never with the caller's $DATABASE_URL)."""
    base = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "users",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**base, **(env or {})},
    )
    out, err = await asyncio.wait_for(process.communicate(), TIMEOUT_S * 2)
    assert process.returncode is not None
    return Result(process.returncode, out.decode(), err.decode())


@pytest.fixture
def cli(database_url: str) -> Callable[..., Awaitable[Result]]:
    """``await cli("add", "alice")``: the command against this test's database."""

    async def run(*args: str) -> Result:
        return await users(*args, "--database-url", database_url)

    return run


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    opened = await Store.open(database_url)
    yield opened
    await opened.close()


async def test_add_prints_a_token_once_as_the_last_word(
    cli: Callable[..., Awaitable[Result]], store: Store
) -> None:
    """``users add`` exits 0 and its last word is a token that authenticates the new user."""
    added = await cli("add", "alice")
    assert added.code == 0, added.err
    user = await store.user_for_token(added.token)
    assert user is not None
    assert user.name == "alice"
    assert len(added.token) >= 43
    assert added.out.count(added.token) == 1


async def test_add_refuses_a_name_that_holds_a_live_token(
    cli: Callable[..., Awaitable[Result]], store: Store
) -> None:
    """Adding an existing user fails clearly, prints no token, and the first token still works."""
    first = await cli("add", "alice")
    again = await cli("add", "alice")
    assert again.code == 1
    assert "exists" in again.err
    assert "revoke" in again.err
    assert again.out == ""
    assert await store.user_for_token(first.token) is not None


async def test_list_shows_users_and_never_tokens(cli: Callable[..., Awaitable[Result]]) -> None:
    """``users list`` names every user with created and revoked columns, and no token."""
    alice, bob = await cli("add", "alice"), await cli("add", "bob")
    assert (await cli("revoke", "bob")).code == 0
    listed = await cli("list")
    assert listed.code == 0, listed.err
    header, *rows = listed.out.splitlines()
    assert header.split() == ["NAME", "CREATED", "REVOKED"]
    by_name = {row.split()[0]: row for row in rows}
    assert set(by_name) == {"alice", "bob"}
    assert by_name["alice"].rstrip().endswith("-")  # not revoked
    assert not by_name["bob"].rstrip().endswith("-")  # a revocation time
    assert alice.token not in listed.out
    assert bob.token not in listed.out


async def test_revoke_stops_the_token_and_add_again_reissues_one(
    cli: Callable[..., Awaitable[Result]], store: Store
) -> None:
    """After ``revoke`` the token fails; adding the user again gives a new token to the same account."""
    first = await cli("add", "alice")
    account = await store.user_for_token(first.token)
    revoked = await cli("revoke", "alice")
    assert revoked.code == 0, revoked.err
    assert await store.user_for_token(first.token) is None
    assert (await cli("revoke", "alice")).code == 0  # already revoked: nothing to do
    second = await cli("add", "alice")
    assert second.code == 0, second.err
    assert second.token != first.token
    assert await store.user_for_token(first.token) is None
    assert await store.user_for_token(second.token) == account


async def test_revoke_of_an_unknown_user_fails(cli: Callable[..., Awaitable[Result]]) -> None:
    """``users revoke`` of a name nobody has exits 1 with a clear message."""
    result = await cli("revoke", "nobody")
    assert result.code == 1
    assert "no user named 'nobody'" in result.err


@pytest.mark.parametrize("name", ["", "a b", "tab\there", "bell\x07", "x" * 65, LOCAL_USER_NAME])
async def test_add_refuses_bad_and_reserved_names(
    cli: Callable[..., Awaitable[Result]], store: Store, name: str
) -> None:
    """Empty, over 64 characters, whitespace, control characters and ``local`` are refused."""
    result = await cli("add", name)
    assert result.code == 1
    assert result.err.startswith("error: ")
    assert result.out == ""
    assert [u.name for u in await store.list_users()] == []


async def test_database_url_comes_from_the_environment_or_before_the_command(
    database_url: str, store: Store
) -> None:
    """$DATABASE_URL is honoured, and the server-style ``--database-url`` before ``users`` too."""
    from_env = await users("add", "alice", env={"DATABASE_URL": database_url})
    assert from_env.code == 0, from_env.err
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "--database-url",
        database_url,
        "users",
        "list",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), TIMEOUT_S * 2)
    assert process.returncode == 0, err.decode()
    assert "alice" in out.decode()
    assert await store.user_for_token(from_env.token) is not None


async def test_a_token_from_the_cli_opens_a_token_server(
    cli: Callable[..., Awaitable[Result]], start_service: ServiceFactory
) -> None:
    """End to end: ``users add`` then ``--auth token``: the printed token is welcomed as that user."""
    added = await cli("add", "alice")
    async with start_service(auth="token") as server:
        client = await Client.connect(ws_url(server))
        welcome = await client.hello(token=added.token)
        assert welcome["user"]["name"] == "alice"
        await client.close()


async def test_revoke_ends_a_connected_users_sessions_at_once(
    cli: Callable[..., Awaitable[Result]],
    store: Store,
    start_service: ServiceFactory,
    engine_gate: GateFactory,
) -> None:
    """``revoke`` (another process) reaches the server through PostgreSQL: the revoked user's
    connection gets ``unauthenticated`` and close 4401 mid-reply, the reply is stored cancelled,
    and another user's connection runs on."""
    alice_token = (await cli("add", "alice")).token
    bob_token = (await cli("add", "bob")).token
    async with start_service(auth="token", disconnect_grace_s=60) as server:
        gate = engine_gate(server)
        alice = await Client.connect(ws_url(server))
        alice_id = uuid.UUID((await alice.hello(token=alice_token))["user"]["id"])
        bob = await Client.connect(ws_url(server))
        await bob.hello(token=bob_token)
        chat = uuid.UUID((await alice.open("s"))["chat"])
        gate.hold(4)  # the prefill and three tokens, then alice's reply waits mid-stream
        await alice.start("s", "Tell me a long story", temperature=0, max_tokens=200)
        await alice.wait_for(lambda f: f["type"] == "token")

        assert (await cli("revoke", "alice")).code == 0
        refusal = await alice.wait_for(lambda f: f["type"] == "error")
        assert refusal["code"] == "unauthenticated", refusal
        assert await expect_close(alice) == CloseCode.UNAUTHENTICATED
        gate.release()
        await server.idle()  # the grace period does not apply: the reply was cancelled and stored
        assert (await bob.request({"type": "ping"}))["type"] == "pong"
        await bob.close()
    messages = await store.messages(alice_id, chat)
    assert messages is not None
    assert [m.status for m in messages if m.role == "assistant"] == ["cancelled"]
