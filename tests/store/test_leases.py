"""Instance leases on the database clock, and the sweeper that interrupts only expired owners'
replies (service.store.leases), against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from urllib.parse import urlsplit, urlunsplit
from uuid import UUID

import asyncpg
import pytest

from service.store import Store, User
from service.store.durable import DurableStore
from service.store.leases import SWEEP_LOCK_KEY, Instance, LeaseKeeper, release, renew, sweep
from tests.completions import completion
from tests.private_postgres import private_postgres
from tests.service.client import TIMEOUT_S
from tests.tcp_relay import tcp_relay


async def _reply_in_flight(store: Store, user: User, owner: Instance | None) -> UUID:
    """A chat whose reply is ``generating``, owned by ``owner``."""
    store.owner = None if owner is None else owner.id
    chat, _ = await store.create_chat(user.id, model="tiny", title=None, system=None, params={})
    assistant_id = uuid.uuid4()
    await store.begin_turn(chat.id, user_text="hi", user_token_ids=[7], assistant_id=assistant_id)
    return assistant_id


async def _statuses(db: asyncpg.Connection) -> dict[UUID, str]:
    return dict(await db.fetch("SELECT id, status FROM messages WHERE role = 'assistant'"))


async def _expire(db: asyncpg.Connection, instance: Instance) -> None:
    """End ``instance``'s lease now (what missing every heartbeat for a lease does)."""
    await db.execute("UPDATE instances SET lease_expires_at = now() WHERE id = $1", instance.id)


async def test_begin_turn_records_the_owner(store: Store, user: User, db: asyncpg.Connection) -> None:
    """The reply placeholder names the store's owner instance; the user message names none."""
    owner = Instance("a")
    reply = await _reply_in_flight(store, user, owner)
    rows = dict(await db.fetch("SELECT role, owner FROM messages"))
    assert rows == {"user": None, "assistant": owner.id}
    assert reply == await db.fetchval("SELECT id FROM messages WHERE owner = $1", owner.id)


async def test_lease_expiry_uses_the_database_clock(store: Store, db: asyncpg.Connection) -> None:
    """renew sets the expiry to the database's now() plus the lease."""
    instance = Instance("a")
    await renew(store, instance, 15.0)
    left = await db.fetchval("SELECT lease_expires_at - now() FROM instances WHERE id = $1", instance.id)
    assert 14.0 < left.total_seconds() <= 15.0
    await release(store, instance)
    assert await db.fetchval("SELECT count(*) FROM instances") == 0


async def test_sweep_interrupts_only_replies_of_expired_owners(
    store: Store, user: User, db: asyncpg.Connection
) -> None:
    """Live owners' replies and the sweeper's own stay generating; an expired owner's and an
    ownerless one become interrupted, and the expired instance row goes (never its own)."""
    me, alive, dead = Instance("me"), Instance("alive"), Instance("dead")
    for instance in (me, alive, dead):
        await renew(store, instance, 30.0)
    mine = await _reply_in_flight(store, user, me)
    live = await _reply_in_flight(store, user, alive)
    orphan = await _reply_in_flight(store, user, dead)
    assert await sweep(store, me) == []
    legacy = await _reply_in_flight(store, user, None)
    await _expire(db, dead)
    await _expire(db, me)  # the sweeper never interrupts its own replies, even past its lease
    assert set(await sweep(store, me) or []) == {orphan, legacy}
    assert await _statuses(db) == {
        mine: "generating",
        live: "generating",
        orphan: "interrupted",
        legacy: "interrupted",
    }
    assert set(await db.fetchval("SELECT array_agg(name) FROM instances")) == {"alive", "me"}
    assert await sweep(store, me) == []


async def test_one_sweeper_at_a_time(store: Store, user: User, db: asyncpg.Connection) -> None:
    """While another replica holds the sweep lock, a sweep skips its turn and touches nothing."""
    dead = Instance("dead")
    await renew(store, dead, 30.0)
    orphan = await _reply_in_flight(store, user, dead)
    await _expire(db, dead)
    async with db.transaction():
        await db.execute("SELECT pg_advisory_xact_lock($1)", SWEEP_LOCK_KEY)
        assert await sweep(store, Instance("me")) is None
    assert (await _statuses(db))[orphan] == "generating"
    assert await sweep(store, Instance("me")) == [orphan]


async def test_the_owners_final_write_wins_over_a_sweep(
    store: Store, user: User, db: asyncpg.Connection
) -> None:
    """More data wins: a reply swept as interrupted is stored in full when its owner finishes."""
    owner = Instance("slow")
    await renew(store, owner, 30.0)
    reply = await _reply_in_flight(store, user, owner)
    await _expire(db, owner)
    assert await sweep(store, Instance("other")) == [reply]
    await store.finish_message(reply, completion("the whole reply"))
    row = await db.fetchrow("SELECT status, text FROM messages WHERE id = $1", reply)
    assert (row["status"], row["text"]) == ("complete", "the whole reply")
    assert await sweep(store, Instance("other")) == []


async def test_a_journaled_final_write_wins_after_the_database_returns(
    database_url: str, db: asyncpg.Connection
) -> None:
    """The write-behind path: the owner loses its database (a cut on its path only) and finishes
    meanwhile (the write waits in the journal); its lease expires and another replica sweeps the
    reply; once the owner reaches the database again the journal's replay stores the full text
    and the real status."""
    parts = urlsplit(database_url)
    async with tcp_relay(parts.hostname or "127.0.0.1", parts.port or 5432) as relay:
        via_relay = urlunsplit(
            parts._replace(netloc=f"{parts.username}:{parts.password}@127.0.0.1:{relay.port}")
        )
        durable = await DurableStore.open(via_relay, max_size=2)
        other = await Store.open(database_url, max_size=1)
        try:
            owner = Instance("owner")
            user = await durable.local_user()
            await renew(durable, owner, 30.0)
            reply = await _reply_in_flight(durable, user, owner)
            relay.cut()
            await asyncio.wait_for(durable.finish_message(reply, completion("all of it")), TIMEOUT_S)
            assert durable.pending_writes == 1  # queued: the owner cannot reach the database
            await _expire(db, owner)
            assert await sweep(other, Instance("sweeper")) == [reply]
            assert (await _statuses(db))[reply] == "interrupted"
            relay.restore()
            durable.journal.kick()
            await asyncio.wait_for(durable.journal.drained(), TIMEOUT_S)
            row = await db.fetchrow("SELECT status, text FROM messages WHERE id = $1", reply)
            assert (row["status"], row["text"]) == ("complete", "all of it")
        finally:
            await other.close()
            await durable.close()


async def test_keeper_registers_sweeps_at_start_and_releases(
    store: Store, user: User, db: asyncpg.Connection
) -> None:
    """start registers the lease and sweeps expired owners at once; stop removes the lease."""
    dead = Instance("dead")
    await renew(store, dead, 30.0)
    orphan = await _reply_in_flight(store, user, dead)
    await _expire(db, dead)
    me = Instance("me")
    keeper = LeaseKeeper(store, me, lease_s=30.0, heartbeat_s=10.0)
    await keeper.start()
    try:
        assert (await _statuses(db))[orphan] == "interrupted"
        assert keeper.swept == 1
        assert await db.fetchval("SELECT name FROM instances") == "me"
    finally:
        await keeper.stop()
    assert await db.fetchval("SELECT count(*) FROM instances") == 0


async def test_keeper_heartbeat_renews_and_sweeps(store: Store, user: User, db: asyncpg.Connection) -> None:
    """Each heartbeat pushes the lease forward and sweeps owners that expired since."""
    keeper = LeaseKeeper(store, Instance("me"), lease_s=30.0, heartbeat_s=0.05)
    await keeper.start()
    try:
        first = await db.fetchval("SELECT lease_expires_at FROM instances")
        dead = Instance("dead")
        await renew(store, dead, 30.0)
        orphan = await _reply_in_flight(store, user, dead)
        await _expire(db, dead)
        async with asyncio.timeout(TIMEOUT_S):
            # A sweep already under way when the lease ended may pulse first: wait for the next.
            while (await _statuses(db))[orphan] != "interrupted":
                await keeper.sweeps.wait()
        assert await db.fetchval("SELECT lease_expires_at FROM instances WHERE name = 'me'") > first
    finally:
        await keeper.stop()


def test_the_heartbeat_must_be_shorter_than_the_lease() -> None:
    """A heartbeat no shorter than the lease would let a live owner's lease lapse."""
    with pytest.raises(ValueError, match="shorter than the lease"):
        LeaseKeeper(None, Instance("x"), lease_s=5.0, heartbeat_s=5.0)  # type: ignore[arg-type]


async def test_keeper_renews_again_once_a_restarted_database_is_back() -> None:
    """PostgreSQL restarted under a running keeper: beats fail while it is down (logged, the
    task goes on), and the next beat after its return renews the lease on a fresh connection."""
    async with private_postgres() as pg:
        store = await Store.open(pg.dsn, max_size=4)
        keeper = LeaseKeeper(store, Instance("me"), lease_s=30.0, heartbeat_s=0.05)
        try:
            await keeper.start()
            await asyncio.to_thread(pg.stop)
            await asyncio.to_thread(pg.start)
            for _ in range(2):  # two full beats after the return (the first may have begun before)
                await asyncio.wait_for(keeper.sweeps.wait(), TIMEOUT_S)
            conn = await asyncpg.connect(pg.dsn)
            try:
                left = await conn.fetchval("SELECT lease_expires_at - now() FROM instances WHERE name = 'me'")
            finally:
                await conn.close()
            assert left.total_seconds() > 25
        finally:
            await keeper.stop()
            await store.close()
