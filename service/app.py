"""Start the whole service from its settings: database, models, server; stop it cleanly.

Start-up order: the database (the embedded one when no URL is given), migrations, this
instance's lease and a first sweep of replies whose owner's lease expired
(service.store.leases), the models (the default one loaded), then the port. SIGINT and
SIGTERM end :func:`run`: the port stops accepting, running generations get a grace period
to finish, then the rest are cancelled and stored, connections close,
the engines stop and the embedded PostgreSQL is shut down (never orphaned).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator

from service.config import ServiceSettings
from service.engine.runner import choose_precision
from service.model_pool import ModelPool
from service.server import ChatServer
from service.store.durable import DurableStore
from service.store.embedded import EmbeddedPostgres
from service.store.leases import Instance, LeaseKeeper
from service.store.store import Store

log = logging.getLogger("service")


@contextlib.asynccontextmanager
async def database(settings: ServiceSettings) -> AsyncIterator[tuple[Store, str]]:
    """An open store, and a description of where it lives (for the logs)."""
    embedded = None
    url = settings.database_url
    if url is None:
        embedded = await asyncio.to_thread(EmbeddedPostgres.start, settings.data_dir)
        url = embedded.dsn
    try:
        # Durable: while the database is away, a turn's writes wait in memory (service.store.durable).
        store = await DurableStore.open(url)
        try:
            where = f"embedded PostgreSQL in {embedded.pgdata}" if embedded else _redacted(url)
            yield store, where
        finally:
            await store.close()
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)


def _redacted(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.rsplit("@", 1)[1]
    return f"{scheme}{sep}{rest}"


@contextlib.asynccontextmanager
async def keep_lease(store: Store, settings: ServiceSettings) -> AsyncIterator[Instance]:
    """This process as an instance that owns the replies it begins, with a lease renewed until
    the block ends (service.store.leases); registering it also sweeps expired owners' replies."""
    instance = Instance(settings.replica.resolved_name())  # resolved already by running_service
    store.owner = instance.id
    keeper = LeaseKeeper(
        store, instance, lease_s=settings.replica.lease_s, heartbeat_s=settings.replica.heartbeat_s
    )
    await keeper.start()
    try:
        yield instance
    finally:
        await keeper.stop()


@contextlib.asynccontextmanager
async def running_service(settings: ServiceSettings) -> AsyncIterator[ChatServer]:
    """The service up and listening until the block ends (tests use this directly)."""
    settings = settings.with_instance_name()
    async with database(settings) as (store, where), keep_lease(store, settings) as instance:
        local_user = await store.local_user()
        precision = choose_precision(settings.precision, settings.engine.device)
        models = await ModelPool.prepare(list(settings.models), settings.data_dir, precision, settings.engine)
        try:
            server = ChatServer(settings, store, models, local_user)
            server.metrics.describe_instance(instance.name, str(instance.id))
            async with server.serve():
                log.info("database: %s", where)
                log.info("instance: %s (id %s)", instance.name, instance.id)
                log.info(
                    "models: %s (default %s)",
                    ", ".join(m["id"] for m in models.describe()),
                    models.default_id,
                )
                log.info("listening on http://%s:%d/ (WebSocket /ws)", settings.server.host, server.port)
                yield server
        finally:
            await models.close()


async def run(settings: ServiceSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with running_service(settings) as server:
        await stop.wait()
        log.info("shutting down")
        await server.drain()
    log.info("stopped")
