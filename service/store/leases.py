"""Ownership of replies in flight across replicas: an instance lease, its heartbeat, the sweeper.

Every process is an *instance* with a fresh id. It registers a row in ``instances`` whose
``lease_expires_at`` its heartbeat pushes to ``now() + lease`` every ``heartbeat_s``: the
database's clock decides, so replicas whose clocks disagree still agree on who is alive. Each
``generating`` reply records its owner (``messages.owner``, written by
:meth:`~service.store.store.Store.begin_turn`).

The sweeper runs at start and after every heartbeat, on every replica, but one at a time: it
takes a transaction-scoped advisory lock with ``pg_try_advisory_xact_lock`` and simply skips
its turn when another replica holds it. It marks ``interrupted`` the ``generating`` replies
whose owner has no live lease (and those with no owner at all: begun before leases existed),
never its own, then deletes the expired instance rows.

Why a lease row rather than a session-level advisory lock per instance: see ``docs/scaling.md``
(in short: a lock held by a TCP session says nothing while the network between the owner and
the database is cut, it needs one dedicated connection per replica that a pooler in
transaction mode cannot give, and it cannot say *how long ago* an owner was last seen).

More data wins: a sweep only ever touches rows still ``generating``, and the owner's final
write (:meth:`~service.store.store.Store.finish_message`) overwrites whatever status a sweeper
set meanwhile, so a reply that outlived its lease (the database was unreachable) is still
stored in full with its real status when the owner gets through.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass, field
from typing import Final
from uuid import UUID

from service.errors import StoreError
from service.store.store import Store

log = logging.getLogger(__name__)

# "localswp" in ASCII: recognisable in pg_locks, distinct from the migrations' key ("localcha").
SWEEP_LOCK_KEY: Final = int.from_bytes(b"localswp", "big")

_RENEW = """
INSERT INTO instances (id, name, lease_expires_at) VALUES ($1, $2, now() + make_interval(secs => $3))
ON CONFLICT (id) DO UPDATE SET name = excluded.name, lease_expires_at = excluded.lease_expires_at
"""

_SWEEP = """
WITH swept AS (
    UPDATE messages m SET status = 'interrupted', finished_at = now()
    WHERE m.status = 'generating'
      AND m.owner IS DISTINCT FROM $1
      AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.id = m.owner AND i.lease_expires_at > now())
    RETURNING m.id
)
SELECT array_agg(id) FROM swept
"""


@dataclass(frozen=True, slots=True)
class Instance:
    """This process as the database knows it."""

    name: str
    id: UUID = field(default_factory=uuid.uuid4)


async def renew(store: Store, instance: Instance, lease_s: float) -> None:
    """Register ``instance`` or extend its lease to ``lease_s`` from now (the database's now)."""
    async with store._connection() as conn:
        await conn.execute(_RENEW, instance.id, instance.name, lease_s)


async def release(store: Store, instance: Instance) -> None:
    """Drop the instance's lease (a clean stop): whatever it still owns is swept at once."""
    async with store._connection() as conn:
        await conn.execute("DELETE FROM instances WHERE id = $1", instance.id)


async def sweep(store: Store, instance: Instance) -> list[UUID] | None:
    """Mark ``interrupted`` the replies whose owner's lease expired, and forget those owners.

    Returns the ids of the replies marked, or None when another replica was sweeping.
    """
    async with store._connection() as conn, conn.transaction():
        if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", SWEEP_LOCK_KEY):
            return None
        swept: list[UUID] | None = await conn.fetchval(_SWEEP, instance.id)
        await conn.execute("DELETE FROM instances WHERE lease_expires_at <= now() AND id <> $1", instance.id)
    return list(swept or [])


class LeaseKeeper:
    """The heartbeat and sweeper of one instance, as one background task.

    ``start`` registers the lease and sweeps once before the server accepts anyone (a database
    failure there fails the start); the task then renews and sweeps every ``heartbeat_s``,
    logging failures and carrying on (the database may come back). ``stop`` ends the task and
    releases the lease.
    """

    def __init__(self, store: Store, instance: Instance, *, lease_s: float, heartbeat_s: float) -> None:
        if not 0 < heartbeat_s < lease_s:
            raise ValueError(f"the heartbeat ({heartbeat_s} s) must be shorter than the lease ({lease_s} s)")
        self.store = store
        self.instance = instance
        self.lease_s = lease_s
        self.heartbeat_s = heartbeat_s
        self.swept = 0  # replies this instance marked interrupted
        self.sweeps = asyncio.Event()  # pulsed after each sweep that ran (tests wait on it)
        self._task: asyncio.Task[None] | None = None
        self._healthy = True

    async def start(self) -> None:
        await renew(self.store, self.instance, self.lease_s)
        await self._sweep()
        self._task = asyncio.create_task(self._run(), name=f"lease-{self.instance.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            # Bounded: with the database away the lease simply runs out instead of holding up the stop.
            async with asyncio.timeout(self.heartbeat_s):
                await release(self.store, self.instance)
        except (StoreError, TimeoutError) as exc:
            log.warning("could not release the lease of instance %s: %r", self.instance.name, exc)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)  # the heartbeat's period, not a synchronisation
            try:
                await renew(self.store, self.instance, self.lease_s)
                await self._sweep()
            except StoreError as exc:
                if self._healthy:
                    log.warning("lease heartbeat failed (replies go on; retrying): %s", exc)
                self._healthy = False
                # After a database restart every pooled connection is dead, and each failed use
                # drops just one: renew the whole pool so the next beat gets through at once.
                await self.store._pool.expire_connections()
                continue
            if not self._healthy:
                log.info("lease heartbeat works again")
            self._healthy = True

    async def _sweep(self) -> None:
        swept = await sweep(self.store, self.instance)
        if swept is None:
            return
        if swept:
            self.swept += len(swept)
            log.warning(
                "marked %d reply(ies) interrupted: their instance's lease expired (%s)",
                len(swept),
                ", ".join(str(s) for s in swept),
            )
        pulsed, self.sweeps = self.sweeps, asyncio.Event()
        pulsed.set()
