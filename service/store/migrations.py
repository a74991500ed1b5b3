"""Forward-only schema migrations: ``sql/NNNN_name.sql`` applied in order when the service starts.

Every pending file is applied in one transaction that first takes a transaction-scoped advisory
lock, so servers starting at once against one database queue up and each file runs exactly once.
Applied files are recorded in ``schema_migrations``; a database recording a version newer than
any file here was migrated by a newer release, and is refused.

The files are found relative to this source file (``<repo>/sql``). That holds in a checkout and in
the editable install ``scripts/install`` makes; the SQL is deliberately not package data.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import asyncpg

from service.errors import StoreError

log = logging.getLogger(__name__)

MIGRATIONS_DIR: Final = Path(__file__).resolve().parents[2] / "sql"

# Any constant bigint works; this one spells "localchat" in ASCII (first 8 bytes), to be
# recognisable in pg_locks and unlikely to collide with another application's advisory lock.
MIGRATION_LOCK_KEY: Final = int.from_bytes(b"localcha", "big")

_FILE_NAME = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str  # the file name, e.g. 0001_init.sql
    sql: str


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migration files of ``directory``, by version. Other files (README.md) are ignored."""
    if not directory.is_dir():
        raise StoreError(f"migrations folder {directory} not found (is the service installed with -e?)")
    migrations: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_NAME.fullmatch(path.name)
        if match is None:
            raise StoreError(f"migration {path} is not named NNNN_name.sql")
        version = int(match.group(1))
        if version in migrations:
            raise StoreError(f"migrations {migrations[version].name} and {path.name} share version {version}")
        migrations[version] = Migration(version, path.name, path.read_text(encoding="utf-8"))
    if not migrations:
        raise StoreError(f"no migrations in {directory}")
    return [migrations[version] for version in sorted(migrations)]


async def apply_migrations(conn: asyncpg.Connection, migrations: Sequence[Migration]) -> list[Migration]:
    """Apply the ``migrations`` this database lacks; return those applied (empty when up to date)."""
    known = max((m.version for m in migrations), default=0)
    async with conn.transaction():
        # Held until commit: a second server blocks here, then sees the first one's work.
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
        await conn.execute(_CREATE_TABLE)
        applied: set[int] = {
            row["version"] for row in await conn.fetch("SELECT version FROM schema_migrations")
        }
        newest = max(applied, default=0)
        if newest > known:
            raise StoreError(
                f"the database has schema version {newest}, newer than this release knows ({known}): "
                "upgrade the service or point it at another database"
            )
        pending = [m for m in migrations if m.version not in applied]
        for migration in pending:
            log.info("applying migration %s", migration.name)
            try:
                await conn.execute(migration.sql)
            except asyncpg.PostgresError as exc:
                raise StoreError(f"migration {migration.name} failed: {exc}") from exc
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                migration.version,
                migration.name,
            )
    return pending
