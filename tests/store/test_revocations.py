"""Revocations reach the server through PostgreSQL, and none is missed across a lost connection."""

from __future__ import annotations

import asyncio
import secrets
from uuid import UUID

import asyncpg
import pytest

from service.revocations import watch_revocations
from service.store import Store
from service.store.records import token_hash
from tests.recorder import Recorder


@pytest.fixture
async def users(store: Store) -> dict[str, UUID]:
    return {
        name: (await store.add_user(name, token_hash(secrets.token_urlsafe(32)))).id
        for name in ("alice", "bob", "carol")
    }


@pytest.fixture
def heard() -> Recorder[UUID]:
    """The user ids a watch reported."""
    return Recorder()


async def reported(heard: Recorder[UUID], user_id: UUID) -> None:
    await heard.until(lambda: user_id in heard.events)


async def test_a_revocation_is_heard_whether_it_came_before_or_while_listening(
    store: Store, users: dict[str, UUID], heard: Recorder[UUID]
) -> None:
    """Revoked before the watch starts: found when it starts listening; revoked while it listens:
    heard from the notification (bob is not among the connected users the start checks)."""
    assert await store.revoke_user("alice")
    watch = asyncio.create_task(watch_revocations(store, lambda: {users["alice"]}, heard))
    try:
        await reported(heard, users["alice"])  # the watch is listening from here on
        assert await store.revoke_user("bob")
        await reported(heard, users["bob"])
        assert users["carol"] not in heard.events
    finally:
        watch.cancel()


async def test_a_revocation_while_the_listening_connection_is_down_is_not_missed(
    store: Store, db: asyncpg.Connection, users: dict[str, UUID], heard: Recorder[UUID]
) -> None:
    """The listening backend is killed (as a database restart would), carol is revoked before the
    watch listens again: the check it makes on listening again finds her."""
    watch = asyncio.create_task(
        watch_revocations(store, lambda: set(users.values()), heard, relisten_delay_s=0.2)
    )
    try:
        assert await store.revoke_user("alice")
        await reported(heard, users["alice"])
        killed = await db.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND query ILIKE 'LISTEN%'"
        )
        assert killed == 1
        assert await store.revoke_user("carol")
        await reported(heard, users["carol"])
        assert users["bob"] not in heard.events
    finally:
        watch.cancel()
