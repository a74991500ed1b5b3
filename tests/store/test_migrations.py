"""Migrations: applied once, recorded, serialised between servers, newer schemas refused."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from service.errors import StoreError
from service.store import Store
from service.store.migrations import MIGRATIONS_DIR, load_migrations


async def _recorded(database_url: str) -> list[tuple[int, str]]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
    finally:
        await conn.close()
    return [(r["version"], r["name"]) for r in rows]


def test_migration_files_are_numbered_from_one() -> None:
    """The sql/ folder holds 0001_init.sql first, versions strictly increasing."""
    migrations = load_migrations(MIGRATIONS_DIR)
    assert migrations[0].version == 1
    assert migrations[0].name == "0001_init.sql"
    assert [m.version for m in migrations] == sorted({m.version for m in migrations})


async def test_migrations_apply_once_and_are_recorded(database_url: str) -> None:
    """Opening twice applies each file once and records it in schema_migrations."""
    expected = [(m.version, m.name) for m in load_migrations()]
    for _ in range(2):
        store = await Store.open(database_url)
        await store.close()
    assert await _recorded(database_url) == expected


async def test_concurrent_opens_both_succeed_and_apply_each_migration_once(database_url: str) -> None:
    """Two servers starting at once on a fresh database queue on the advisory lock."""
    stores = await asyncio.gather(*(Store.open(database_url) for _ in range(3)))
    for store in stores:
        await store.ping()
        await store.close()
    assert await _recorded(database_url) == [(m.version, m.name) for m in load_migrations()]


async def test_newer_schema_version_is_refused(database_url: str) -> None:
    """A database migrated by a newer release makes open fail with a clear StoreError."""
    store = await Store.open(database_url)
    await store.close()
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("INSERT INTO schema_migrations (version, name) VALUES (9999, '9999_future.sql')")
    finally:
        await conn.close()
    with pytest.raises(StoreError, match="newer than this release knows"):
        await Store.open(database_url)


async def test_unreachable_database_is_a_store_error_without_the_password() -> None:
    """Nothing listening: open raises StoreError, and the message masks the password."""
    with pytest.raises(StoreError, match="cannot connect") as caught:
        await Store.open("postgresql://someone:s3cret@127.0.0.1:1/nothing", connect_timeout=2)
    assert "s3cret" not in str(caught.value)


async def test_ping_fails_with_store_error_once_closed(database_url: str) -> None:
    """ping answers while the pool is open and raises StoreError after close."""
    store = await Store.open(database_url)
    await store.ping()
    await store.close()
    with pytest.raises(StoreError):
        await store.ping()
