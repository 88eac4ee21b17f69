"""`mailfc domain add|list|show|suspend|resume|remove|import`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg
import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

from mailfc import eventloop
from mailfc.cli.common import emit, json_option, pass_config, print_json, run_db, say
from mailfc.config import Config
from mailfc.db import connect, domains, importer

COLUMNS = ("name", "state", "host", "accounts", "aliases", "created_at")


@click.group("domain")
def group() -> None:
    """Hosted mail domains."""


@group.command("add")
@click.argument("name")
@json_option
@pass_config
def add(config: Config, name: str, as_json: bool) -> None:
    """Add a hosted domain (IDNA names are stored in ASCII form)."""
    row = run_db(config, lambda db: domains.add(db, name))
    if as_json:
        print_json(row)
    else:
        say(f"domain {row['name']} added")


@group.command("list")
@click.option("--state", type=click.Choice(["active", "suspended"]), default=None)
@click.option("--match", "pattern", default=None, help="Name pattern, * as wildcard.")
@json_option
@pass_config
def list_cmd(config: Config, state: str | None, pattern: str | None, as_json: bool) -> None:
    """List domains."""
    rows = run_db(config, lambda db: domains.list_all(db, state=state, pattern=pattern))
    emit(rows, as_json=as_json, columns=COLUMNS, empty="no domains")


@group.command("show")
@click.argument("name")
@json_option
@pass_config
def show(config: Config, name: str, as_json: bool) -> None:
    """Show one domain."""
    emit(run_db(config, lambda db: domains.get(db, name)), as_json=as_json)


def _set_state(config: Config, name: str, state: str, as_json: bool) -> None:
    row = run_db(config, lambda db: domains.set_state(db, name, state))
    if as_json:
        print_json(row)
    else:
        say(f"domain {row['name']} is {state}")


@group.command("suspend")
@click.argument("name")
@json_option
@pass_config
def suspend(config: Config, name: str, as_json: bool) -> None:
    """Suspend a domain: its mail is refused and its users cannot log in."""
    _set_state(config, name, "suspended", as_json)


@group.command("resume")
@click.argument("name")
@json_option
@pass_config
def resume(config: Config, name: str, as_json: bool) -> None:
    """Resume a suspended domain."""
    _set_state(config, name, "active", as_json)


@group.command("remove")
@click.argument("name")
@click.option("--force", is_flag=True, help="Remove the domain with its accounts and aliases.")
@json_option
@pass_config
def remove(config: Config, name: str, force: bool, as_json: bool) -> None:
    """Remove a domain from the CMDB (its maildirs stay on disk)."""
    row = run_db(config, lambda db: domains.remove(db, name, force=force))
    if as_json:
        print_json(row)
    else:
        say(f"domain {row['name']} removed ({row['accounts']} account(s)); "
            f"its maildirs under {config.mail_root / row['name']} were kept")


@group.command("import")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--batch-size", default=importer.DEFAULT_BATCH, show_default=True,
              type=click.IntRange(1, 100_000))
@json_option
@pass_config
def import_cmd(config: Config, path: Path, batch_size: int, as_json: bool) -> None:
    """Import domains and accounts from a CSV file (see mailfc.db.importer for the format)."""
    rows = importer.parse(path)
    importer.hash_plain_passwords(rows)

    async def main() -> importer.ImportReport:
        pool = await connect(config)
        try:
            async with pool.acquire() as db:
                return await _import(db, rows, batch_size, show_progress=not as_json)
        finally:
            await pool.close()

    report = eventloop.run(main())
    result: dict[str, Any] = {
        "rows": len(rows), "domains_added": report.domains_added,
        "accounts_added": report.accounts_added, "failed_batches": report.batches_failed,
    }
    if as_json:
        print_json(result)
    else:
        say(f"{report.domains_added} domain(s) and {report.accounts_added} account(s) imported "
            f"from {len(rows)} row(s)")
        for failure in report.batches_failed:
            click.echo(f"failed batch: {failure}", err=True)
    if not report.ok:
        raise click.exceptions.Exit(1)


async def _import(
    db: asyncpg.Connection, rows: list[importer.Row], batch_size: int, *, show_progress: bool
) -> importer.ImportReport:
    if not show_progress:
        return await importer.import_rows(db, rows, batch_size=batch_size)
    columns = (*Progress.get_default_columns()[:1], BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn())
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task("importing", total=len(rows))
        return await importer.import_rows(
            db, rows, batch_size=batch_size,
            progress=lambda done: progress.advance(task, done),
        )
