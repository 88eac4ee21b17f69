"""`mailfc db migrate|status|stop|maintain|dump|restore`: the CMDB itself.

    mailfc db dump FILE              # pg_dump, custom format, of the CMDB into FILE
    mailfc db restore FILE [--force] # pg_restore of such a dump into the CMDB

dump refuses to overwrite FILE and writes FILE.partial first, so a failed dump
leaves no file that looks whole.  restore refuses a database that holds tables
(restoring over live data is rarely meant: --force drops the schema and restores
the dump, in one transaction, so a failed restore changes nothing) and refuses
while a `mailfc up` of this configuration runs (its processes would write into the
half-restored tables: stop it first).  Both start the embedded cluster if it is
stopped, as every command does; with database.dsn they work on that server, with
the pg_dump/pg_restore/psql of this machine.  The dump holds the CMDB only:
docs/operations.md lists the rest of a backup (maildirs, spools, TLS keys, the
configuration).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Any

import asyncpg
import click

from mailfc import eventloop
from mailfc.cli.common import emit, json_option, pass_config, print_json, run_db, say
from mailfc.cli.status import running_platform
from mailfc.config import Config
from mailfc.db import migrate, open_pool
from mailfc.db.embedded import find_pg_binary
from mailfc.db.pool import database_dsn, embedded_cluster
from mailfc.errors import DatabaseError, InvalidInput


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


def _pg_command(config: Config, program: str, *args: str) -> list[str]:
    """`program` on the CMDB; as the embedded cluster's user when root runs it (the
    cluster trusts that user on its socket only)."""
    command = [find_pg_binary(program), *args]
    if config.uses_embedded_database and os.geteuid() == 0:
        command = ["runuser", "-u", config.database.embedded_user, "--", *command]
    return command


def _dsn(config: Config) -> str:
    try:
        return database_dsn(config)
    except DatabaseError as error:
        raise DatabaseError(f"the database is not available: {error}") from None


def _complaint(stderr: bytes) -> str:
    lines = [line for line in stderr.decode("utf-8", "replace").splitlines() if line.strip()]
    return "; ".join(lines[-3:]) or "no message"


@group.command("dump")
@click.argument("file", type=click.Path(dir_okay=False))
@pass_config
def dump(config: Config, file: str) -> None:
    """Write the CMDB into FILE (pg_dump's custom format; `mailfc db restore` reads it)."""
    target = Path(file)
    if target.exists():
        raise InvalidInput(f"{target} exists: choose another file name or remove it first")
    if not target.parent.is_dir():
        raise InvalidInput(f"{target.parent} is not a directory: create it first")
    partial = target.with_name(target.name + ".partial")
    dsn = _dsn(config)
    try:
        with partial.open("wb") as output:
            result = subprocess.run(
                _pg_command(config, "pg_dump", "--format=custom", "--dbname", dsn),
                stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.PIPE,
                check=False, cwd="/")
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise InvalidInput(f"cannot write {partial}: {error.strerror or error}") from None
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise DatabaseError(f"pg_dump failed: {_complaint(result.stderr)}")
    partial.rename(target)
    say(f"CMDB dumped to {target} ({target.stat().st_size} bytes)")


async def _table_count(dsn: str) -> int:
    connection = await asyncpg.connect(dsn, timeout=30)
    try:
        count = await connection.fetchval(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
        return int(count)
    finally:
        await connection.close()


def _restore(config: Config, dsn: str, source: Path, preamble: bytes) -> str:
    """pg_restore FILE | psql --single-transaction; what went wrong, "" if nothing."""
    with source.open("rb") as dump:
        to_sql = subprocess.Popen(
            _pg_command(config, "pg_restore", "--no-owner", "--file", "-"),
            stdin=dump, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/")
    run_sql = subprocess.Popen(
        _pg_command(config, "psql", "--quiet", "--no-psqlrc", "--single-transaction",
                    "--set", "ON_ERROR_STOP=1", "--dbname", dsn),
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd="/")
    assert to_sql.stdout is not None and run_sql.stdin is not None
    try:
        run_sql.stdin.write(preamble)
        while chunk := to_sql.stdout.read(1 << 16):
            run_sql.stdin.write(chunk)
    except BrokenPipeError:
        pass  # psql stopped at an error: its stderr says which
    finally:
        with contextlib.suppress(BrokenPipeError):
            run_sql.stdin.close()
    restore_err = to_sql.stderr.read() if to_sql.stderr else b""
    sql_err = run_sql.stderr.read() if run_sql.stderr else b""
    if to_sql.wait() != 0:
        run_sql.wait()
        return f"pg_restore: {_complaint(restore_err)}"
    if run_sql.wait() != 0:
        return f"psql: {_complaint(sql_err)}"
    return ""


@group.command("restore")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True,
              help="Restore into a database that holds tables: they are dropped first.")
@pass_config
def restore(config: Config, file: str, force: bool) -> None:
    """Restore the CMDB from FILE, a `mailfc db dump` (stop `mailfc up` first)."""
    source = Path(file)
    if not source.is_file():
        raise InvalidInput(f"{source} does not exist or is not a file: give a file"
                           " written by `mailfc db dump`")
    with source.open("rb") as handle:
        if handle.read(5) != b"PGDMP":
            raise InvalidInput(f"{source} is not a dump of `mailfc db dump` "
                               "(pg_dump's custom format)")
    running = running_platform(config)
    if running is not None:
        raise InvalidInput(f"mailfc up runs on this configuration (pid {running.pid}):"
                           " stop it first, then restore, then start it again")
    dsn = _dsn(config)
    try:
        tables = eventloop.run(_table_count(dsn))
    except (OSError, asyncpg.PostgresError) as error:
        raise DatabaseError(f"cannot connect to the database: {error}") from None
    if tables and not force:
        raise InvalidInput(f"the database holds {tables} table(s): restoring would mix two"
                           " states; add --force to drop them and restore the dump")
    # pg_restore turns the dump into SQL, psql runs it in one transaction after the
    # old schema's removal: a restore that fails changes nothing.  (pg_restore --clean
    # cannot drop the partitions' inherited constraints.)
    preamble = b"DROP SCHEMA public CASCADE;\nCREATE SCHEMA public;\n" if tables else b""
    failure = _restore(config, dsn, source, preamble)
    if failure:
        raise DatabaseError(f"the restore failed and changed nothing: {failure}")
    say(f"CMDB restored from {source}")
