"""The durable store against a real PostgreSQL that stops and starts: writes wait in memory while
it is down and land when it returns; reads and readiness refuse meanwhile; replays are idempotent."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

import pytest

from service.errors import StoreError, StoreUnavailable
from service.store import Store, User
from service.store.durable import DurableStore
from tests.completions import completion
from tests.private_postgres import PrivatePostgres, private_postgres
from tests.service.client import TIMEOUT_S


@pytest.fixture
async def pg() -> AsyncIterator[PrivatePostgres]:
    """A PostgreSQL of this test's own, that it may stop and start."""
    async with private_postgres() as server:
        yield server


@pytest.fixture
async def durable(pg: PrivatePostgres) -> AsyncIterator[DurableStore]:
    store = await DurableStore.open(pg.dsn, max_size=3)
    store.journal.backoff_max_s = 0.2
    try:
        yield store
    finally:
        await store.close()


async def _drained(store: DurableStore) -> None:
    await asyncio.wait_for(store.journal.drained(), TIMEOUT_S)


@pytest.mark.parametrize("mode", ["immediate", "fast"])
async def test_turn_writes_wait_out_an_outage_and_land_in_order(
    pg: PrivatePostgres, durable: DurableStore, mode: str
) -> None:
    """With the database stopped, a new chat, a turn and its reply are accepted at once (queued);
    reads and ping refuse with StoreUnavailable; after a restart all of it is stored as written."""
    user = await durable.local_user()
    before, _ = await durable.create_chat(user.id, model="tiny", title=None, system=None, params={})
    await asyncio.to_thread(pg.stop, mode)

    chat, system = await durable.create_chat(
        user.id, model="tiny", title=None, system="Be brief.", params={"temperature": 0}
    )
    reply_id = uuid.uuid4()
    user_message = await durable.begin_turn(
        chat.id, user_text="hello", user_token_ids=[5, 6, 7], assistant_id=reply_id, prompt_offset=2
    )
    await durable.finish_message(reply_id, completion("hi!", token_ids=[8, 9], completion_tokens=2))
    assert durable.pending_writes == 3
    for read in (
        durable.messages(user.id, before.id),
        durable.get_chat(user.id, chat.id),
        durable.list_chats(user.id, limit=10),
        durable.ping(),
    ):
        with pytest.raises(StoreUnavailable):
            await read

    await asyncio.to_thread(pg.start)
    await _drained(durable)
    await durable.ping()
    stored = await durable.messages(user.id, chat.id)
    assert stored is not None
    assert [(m.id, m.role, m.text, m.status, m.token_ids) for m in stored] == [
        (system[0].id, "system", "Be brief.", "complete", []),
        (user_message.id, "user", "hello", "complete", [5, 6, 7]),
        (reply_id, "assistant", "hi!", "complete", [8, 9]),
    ]
    assert stored[1].prompt_offset == 2
    assert stored[1].created_at == user_message.created_at  # the time it was sent, not replayed
    found = await durable.get_chat(user.id, chat.id)
    assert found is not None
    assert (found.created_at, found.params, found.title) == (chat.created_at, {"temperature": 0}, "hello")


async def test_reads_after_a_restart_reconnect_without_failing(
    pg: PrivatePostgres, durable: DurableStore
) -> None:
    """Pooled connections died with the server: the first read after the restart still succeeds."""
    user = await durable.local_user()
    chat, _ = await durable.create_chat(user.id, model="tiny", title="t", system=None, params={})
    await asyncio.to_thread(pg.stop, "immediate")
    await asyncio.to_thread(pg.start)
    assert await durable.messages(user.id, chat.id) == []
    await durable.ping()


async def test_a_write_the_database_refuses_still_fails_the_caller(durable: DurableStore) -> None:
    """A turn of a chat that does not exist is an error, not an outage: nothing is queued."""
    with pytest.raises(StoreError) as raised:
        await durable.begin_turn(uuid.uuid4(), user_text="x", user_token_ids=[], assistant_id=uuid.uuid4())
    assert not isinstance(raised.value, StoreUnavailable)
    assert durable.pending_writes == 0


async def test_closing_with_the_database_down_logs_each_lost_write(
    pg: PrivatePostgres, durable: DurableStore, caplog: pytest.LogCaptureFixture
) -> None:
    """Shutdown flushes for a bounded time; a reply it could not store is logged as lost."""
    await asyncio.to_thread(pg.stop, "immediate")
    reply_id = uuid.uuid4()
    await durable.finish_message(reply_id, completion("never stored", token_ids=[1], completion_tokens=1))
    durable.flush_timeout_s = 0.1
    with caplog.at_level(logging.ERROR, logger="service.store.journal"):
        await durable.close()
    assert f"LOST: reply {reply_id}" in caplog.text


async def test_replayed_writes_store_each_row_once(store: Store, user: User) -> None:
    """create_chat and begin_turn with ids made up front are idempotent: a replay of a write whose
    answer was lost returns what is stored and adds nothing."""
    chat_id, system_id, message_id, reply_id = (uuid.uuid4() for _ in range(4))
    first = await store.create_chat(
        user.id, model="tiny", title=None, system="sys", params={}, chat_id=chat_id, system_id=system_id
    )
    again = await store.create_chat(
        user.id, model="tiny", title=None, system="sys", params={}, chat_id=chat_id, system_id=system_id
    )
    assert again == first
    turn = {"user_text": "q", "user_token_ids": [1], "assistant_id": reply_id, "user_message_id": message_id}
    stored = await store.begin_turn(chat_id, **turn)  # type: ignore[arg-type]
    assert await store.begin_turn(chat_id, **turn) == stored  # type: ignore[arg-type]
    await store.finish_message(reply_id, completion("a", token_ids=[2], completion_tokens=1))
    history = await store.messages(user.id, chat_id)
    assert history is not None
    assert [(m.id, m.role) for m in history] == [
        (system_id, "system"),
        (message_id, "user"),
        (reply_id, "assistant"),
    ]
