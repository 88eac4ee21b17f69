"""Versioned schema migrations: ordered SQL files applied once each.

Files live in mailfc/db/migrations/ as NNNN_name.sql.  Each is applied in its
own transaction and recorded in `schema_migrations` with a checksum; an applied
file that changed later is an error (a migration is never edited, a new one is
written).  A session-level advisory lock makes concurrent migrators take turns.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from importlib import resources

import asyncpg

from mailfc.errors import DatabaseError

_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_LOCK_KEY = 0x6D61696C6663  # "mailfc"

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    checksum    text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    @property
    def label(self) -> str:
        return f"{self.version:04d}_{self.name}"


@dataclass(frozen=True)
class MigrationStatus:
    migration: Migration
    applied_at: datetime | None


def available() -> list[Migration]:
    migrations = []
    for entry in resources.files("mailfc.db").joinpath("migrations").iterdir():
        match = _FILE_NAME.match(entry.name)
        if match:
            migrations.append(
                Migration(int(match.group(1)), match.group(2), entry.read_text("utf-8"))
            )
    migrations.sort(key=lambda m: m.version)
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise DatabaseError("two migration files share a version number")
    return migrations


async def _applied(connection: asyncpg.Connection) -> dict[int, asyncpg.Record]:
    await connection.execute(_CREATE_TABLE)
    rows = await connection.fetch("SELECT version, checksum, applied_at FROM schema_migrations")
    return {row["version"]: row for row in rows}


def _check_unchanged(migration: Migration, row: asyncpg.Record) -> None:
    if row["checksum"] != migration.checksum:
        raise DatabaseError(
            f"migration {migration.label} changed after it was applied: restore the "
            "file and put the change in a new migration"
        )


async def status(connection: asyncpg.Connection) -> list[MigrationStatus]:
    applied = await _applied(connection)
    result = []
    for migration in available():
        row = applied.get(migration.version)
        if row is not None:
            _check_unchanged(migration, row)
        result.append(MigrationStatus(migration, row["applied_at"] if row else None))
    return result


async def pending(connection: asyncpg.Connection) -> list[Migration]:
    return [s.migration for s in await status(connection) if s.applied_at is None]


async def apply(connection: asyncpg.Connection) -> list[Migration]:
    """Apply every pending migration; returns those applied now."""
    await connection.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        done = []
        for migration in await pending(connection):
            try:
                async with connection.transaction():
                    await connection.execute(migration.sql)
                    await connection.execute(
                        "INSERT INTO schema_migrations (version, name, checksum)"
                        " VALUES ($1, $2, $3)",
                        migration.version, migration.name, migration.checksum,
                    )
            except asyncpg.PostgresError as error:
                raise DatabaseError(f"migration {migration.label} failed: {error}") from None
            done.append(migration)
        return done
    finally:
        await connection.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
