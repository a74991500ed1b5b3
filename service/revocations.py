"""Ending the sessions of a user whose token is revoked, while they are connected.

``users revoke`` runs in another process than the server, so it tells the server through
PostgreSQL: the revocation commits with a ``NOTIFY`` carrying the user's id (see
:meth:`~service.store.store.Store.revoke_user`). The server listens on one connection of its
pool. Notifications sent while that connection is down (a database restart) are never
delivered, so every time it listens again it also asks the database which of the connected
users are revoked by now: a revocation is acted on within a reconnect, never missed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection
from uuid import UUID

from service.errors import StoreError
from service.store.records import parse_id
from service.store.store import REVOKED_CHANNEL, Store

log = logging.getLogger(__name__)

RELISTEN_DELAY_S = 1.0  # between attempts to listen again while the database is away


async def watch_revocations(
    store: Store,
    connected_users: Callable[[], Collection[UUID]],
    on_revoked: Callable[[UUID], None],
    *,
    relisten_delay_s: float = RELISTEN_DELAY_S,
) -> None:
    """Call ``on_revoked(user_id)`` for every revoked user among ``connected_users()``, as long
    as the task runs (cancel it to stop)."""

    def heard(payload: str) -> None:
        user_id = parse_id(payload)
        if user_id is not None:
            on_revoked(user_id)

    listening = True  # whether the last attempt got to listen (logs only the changes)
    while True:
        try:
            async with store.listen(REVOKED_CHANNEL, heard) as lost:
                if not listening:
                    log.info("listening for token revocations again")
                    listening = True
                for user_id in await store.revoked_among(set(connected_users())):
                    on_revoked(user_id)
                await lost.wait()
            reason = "the database connection was lost"
        except StoreError as exc:
            reason = str(exc)
        if listening:
            log.warning("not listening for token revocations (%s); retrying", reason)
            listening = False
        await asyncio.sleep(relisten_delay_s)
