"""`mailfc db migrate|status|stop|maintain`: the CMDB itself."""

from __future__ import annotations

from typing import Any

import asyncpg
import click

from mailfc import eventloop
from mailfc.cli.common import emit, json_option, pass_config, print_json, run_db, say
from mailfc.config import Config
from mailfc.db import migrate, open_pool
from mailfc.db.pool import embedded_cluster


@click.group("db")
def group() -> None:
    """Migrate, inspect and stop the database."""


async def _on_pool(config: Config, action: Any) -> Any:
    pool = await open_pool(config)
    try:
        async with pool.acquire() as connection:
            return await action(connection)
    finally:
        await pool.close()


@group.command("migrate")
@json_option
@pass_config
def migrate_cmd(config: Config, as_json: bool) -> None:
    """Apply pending schema migrations (each once, in order)."""
    applied = eventloop.run(_on_pool(config, migrate.apply))
    if as_json:
        print_json({"applied": [m.label for m in applied]})
    elif applied:
        say("applied: " + ", ".join(m.label for m in applied))
    else:
        say("schema is current; nothing to apply")


@group.command("status")
@json_option
@pass_config
def status(config: Config, as_json: bool) -> None:
    """Show each migration and when it was applied."""
    rows = eventloop.run(_on_pool(config, migrate.status))
    emit(
        [{"migration": s.migration.label, "applied_at": s.applied_at} for s in rows],
        as_json=as_json,
    )


@group.command("maintain")
@json_option
@pass_config
def maintain(config: Config, as_json: bool) -> None:
    """Create the coming days' session partitions and drop those past retention."""

    async def action(db: asyncpg.Connection) -> dict[str, int]:
        created = await db.fetchval("SELECT mailfc_ensure_partitions(1, 7)")
        dropped = await db.fetchval(
            "SELECT mailfc_drop_partitions($1)", config.database.retention_days
        )
        return {"partitions_created": created, "partitions_dropped": dropped}

    result = run_db(config, action)
    if as_json:
        print_json(result)
    else:
        say(f"{result['partitions_created']} partition(s) created, "
            f"{result['partitions_dropped']} dropped")


@group.command("stop")
@pass_config
def stop(config: Config) -> None:
    """Stop the embedded PostgreSQL cluster (it starts again on demand)."""
    if not config.uses_embedded_database:
        raise click.ClickException(
            "database.dsn points at an external server; mailfc never starts or stops it"
        )
    if embedded_cluster(config).stop():
        say("embedded PostgreSQL stopped")
    else:
        say("embedded PostgreSQL was not running")
