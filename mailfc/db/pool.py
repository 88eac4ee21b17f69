"""The asyncpg connection pool, and starting the embedded cluster behind it.

With the embedded cluster (no `database.dsn`), mailfc owns the database, so a
pending migration is applied on connect.  With an external server the admin
owns the schema: a pending migration is an error that says to run
`mailfc db migrate`.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import asyncpg

from mailfc.config import Config
from mailfc.db import migrate
from mailfc.db.embedded import EmbeddedCluster
from mailfc.errors import DatabaseError


def embedded_cluster(config: Config) -> EmbeddedCluster:
    return EmbeddedCluster(root=Path(config.state_dir) / "postgres",
                           user=config.database.embedded_user)


def database_dsn(config: Config, *, start: bool = True) -> str:
    """The DSN to use; starts the embedded cluster first when it is the one."""
    if not config.uses_embedded_database:
        return config.database.dsn
    cluster = embedded_cluster(config)
    if start:
        cluster.ensure_running()
    return cluster.dsn


async def keep_session(connection: asyncpg.Connection) -> None:
    """A connection back in the pool is kept as it is.

    asyncpg's default reset sends `SELECT pg_advisory_unlock_all(); CLOSE ALL;
    UNLISTEN *; RESET ALL` on every release, a second round trip for each query
    made through the pool, awaited before the query's caller goes on.  mailfc
    leaves no session state behind: its advisory locks are transaction-scoped
    (the migration lock is unlocked by its holder), it never LISTENs, SETs or
    keeps cursors.  An open transaction is still rolled back by asyncpg itself.
    """


async def open_pool(config: Config, *, start: bool = True) -> asyncpg.Pool:
    """A pool on the configured database, without touching the schema."""
    dsn = await asyncio.to_thread(database_dsn, config, start=start)
    try:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=config.database.pool_min_size,
            max_size=config.database.pool_max_size,
            command_timeout=config.database.command_timeout_s,
            server_settings={"application_name": "mailfc"},
            reset=keep_session,
        )
    except (OSError, asyncpg.PostgresError, socket.gaierror) as error:
        where = "the embedded cluster" if config.uses_embedded_database else "database.dsn"
        raise DatabaseError(f"cannot connect to {where}: {error}") from None
    assert pool is not None
    return pool


async def connect(config: Config) -> asyncpg.Pool:
    """A pool on a database whose schema is current."""
    pool = await open_pool(config)
    try:
        async with pool.acquire() as connection:
            if config.uses_embedded_database:
                await migrate.apply(connection)
            else:
                pending = await migrate.pending(connection)
                if pending:
                    names = ", ".join(m.label for m in pending)
                    raise DatabaseError(
                        f"the database schema is not current ({names} pending): "
                        "run mailfc db migrate"
                    )
    except BaseException:
        await pool.close()
        raise
    return pool
