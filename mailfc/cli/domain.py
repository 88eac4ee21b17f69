"""`mailfc domain add|list|show|set|suspend|resume|remove|archives|import`.

    mailfc domain set DOMAIN [--idle-timeout 10m] [--lifetime 1h]
        the domain's containers stop after that long idle, and are replaced
        after that long alive (every service alike); `domain show` prints them
    mailfc domain remove DOMAIN [--force] [--purge]
        suspends the domain, stops its containers on this host at once (those
        on other hosts are removed by their controller's next round: no CMDB
        row owns them any more), deletes it from the CMDB, then moves its mail
        and state (queues) into an archive under <state_dir>/archive named
        with the removal time, or with --purge deletes them.  Nothing is left
        where a new domain of the same name would find it.
    mailfc domain archives [DOMAIN]
        the archives of removed domains, oldest first

A domain added while mail of an earlier domain of that name is still on disk
(removed by an older mailfc, or by SQL) gets that mail archived first, never
attached.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

from mailfc import eventloop
from mailfc.addresses import normalize_domain
from mailfc.cli.common import emit, json_option, pass_config, print_json, run_db, say
from mailfc.config import Config
from mailfc.db import connect, domains, events, importer
from mailfc.durations import format_duration, parse_duration
from mailfc.errors import MailfcError
from mailfc.runtime import archive, from_config
from mailfc.runtime.lifecycle import Runtime
from mailfc.runtime.settings import RuntimeSettings

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
    # Mail of an earlier domain of this name must not become the new owner's.
    leftover = _move_data(from_config(config), row["name"], purge=False)
    if as_json:
        print_json({**row, "archived_leftovers": leftover})
        return
    say(f"domain {row['name']} added")
    if leftover:
        say(f"mail of an earlier domain {row['name']} was still on disk: archived in"
            f" {leftover}")


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
    """Show one domain, with its containers' idle timeout and lifetime."""

    async def action(db: asyncpg.Connection) -> dict[str, Any]:
        return {**await domains.get(db, name), "timeouts": await domains.timeouts(db, name)}

    row = run_db(config, action)
    if as_json:
        print_json(row)
        return
    timeouts = row.pop("timeouts")
    row["idle_timeout"] = _describe(timeouts, "idle_timeout_s")
    row["lifetime"] = _describe(timeouts, "lifetime_s")
    emit(row, as_json=False)


def _describe(timeouts: dict[str, dict[str, Any]], key: str) -> str:
    """'10m', '10m (default)', or per service when they differ."""
    own = any(values["own"] for values in timeouts.values())
    shown = {service: format_duration(values[key]) for service, values in timeouts.items()}
    if len(set(shown.values())) == 1:
        text = next(iter(shown.values()))
    else:
        text = ", ".join(f"{service} {value}" for service, value in sorted(shown.items()))
    return text if own else f"{text} (default)"


@group.command("set")
@click.argument("name")
@click.option("--idle-timeout", default=None,
              help="Stop the domain's containers after this long idle (e.g. 10m).")
@click.option("--lifetime", default=None,
              help="Replace the domain's containers after this long (e.g. 1h).")
@json_option
@pass_config
def set_cmd(config: Config, name: str, idle_timeout: str | None, lifetime: str | None,
            as_json: bool) -> None:
    """Change the domain's container idle timeout and lifetime (running ones too)."""
    if idle_timeout is None and lifetime is None:
        raise click.UsageError("give --idle-timeout and/or --lifetime")
    idle_s = parse_duration(idle_timeout) if idle_timeout is not None else None
    lifetime_s = parse_duration(lifetime) if lifetime is not None else None
    timeouts = run_db(config, lambda db: domains.set_timeouts(
        db, name, idle_timeout_s=idle_s, lifetime_s=lifetime_s))
    if as_json:
        print_json(timeouts)
    else:
        say(f"domain {name}: idle timeout {_describe(timeouts, 'idle_timeout_s')},"
            f" lifetime {_describe(timeouts, 'lifetime_s')}")


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
@click.option("--purge", is_flag=True,
              help="Delete its mail and queues instead of archiving them.")
@json_option
@pass_config
def remove(config: Config, name: str, force: bool, purge: bool, as_json: bool) -> None:
    """Remove a domain: stop its containers, delete it, archive (or purge) its mail."""
    settings = from_config(config, netns_pool_size=0)

    async def main() -> dict[str, Any]:
        pool = await connect(config)
        try:
            async with pool.acquire() as db:
                info = await domains.prepare_removal(db, name, force=force)
                live = await domains.live_containers(db, name)
            stopped, pending = await _stop_containers(config, settings, pool, info["name"],
                                                      live)
            async with pool.acquire() as db:
                info = await domains.remove(db, name, force=force)
            data = await asyncio.to_thread(_move_data, settings, info["name"], purge)
            detail = {"stopped": stopped, "left_to_controllers": pending,
                      "purged" if purge else "archive": data}
            await events.record(pool, "domain_remove",
                                f"domain removed: {len(stopped)} container(s) stopped, mail"
                                + (" purged" if purge else f" archived in {data}"),
                                host=config.host_name, domain=info["name"], detail=detail)
            return {**info, **detail}
        finally:
            await pool.close()

    row = eventloop.run(main())
    if as_json:
        print_json(row)
        return
    say(f"domain {row['name']} removed ({row['accounts']} account(s));"
        f" {len(row['stopped'])} container(s) stopped")
    for line in row["left_to_controllers"]:
        say(line)
    if purge:
        say("its mail and queues were deleted" if row["purged"] else "it had no mail on disk")
    elif row["archive"]:
        say(f"its mail and queues were archived in {row['archive']}")
    else:
        say("it had no mail on disk")


async def _stop_containers(config: Config, settings: RuntimeSettings, pool: asyncpg.Pool,
                           domain: str, live: list[dict[str, Any]]
                           ) -> tuple[list[str], list[str]]:
    """Stop the domain's containers on this host; (stopped names, notes on the rest)."""
    here = settings.resolved_host_name
    local = [c for c in live if c["host"] == here]
    notes = [f"container {c['name']} on host {c['host']}: its controller removes it within"
             " a round" for c in live if c["host"] != here]
    if not local:
        return [], notes
    runtime = Runtime(settings, pool)
    try:
        await runtime.open(fill_pool=False)
        stopped = await runtime.remove_domain(domain, drain_timeout=2.0)
    except MailfcError as error:
        notes += [f"container {c['name']}: not stopped here ({error}); the controller of"
                  f" {here} removes it within a round" for c in local]
        return [], notes
    finally:
        await runtime.close()
    return stopped, notes


def _move_data(settings: RuntimeSettings, domain: str, purge: bool) -> str | list[str] | None:
    """Archive (or delete) the domain's mail and state; where it went."""
    try:
        if purge:
            return [str(path) for path in archive.purge(settings, domain)]
        moved = archive.archive(settings, domain)
    except PermissionError as error:
        raise MailfcError(f"cannot move the mail of {domain}: {error}; run mailfc as root"
                          " (the maildirs belong to the containers' users)") from None
    return str(moved.path) if moved else None


@group.command("archives")
@click.argument("name", required=False)
@json_option
@pass_config
def archives_cmd(config: Config, name: str | None, as_json: bool) -> None:
    """List the archived mail of removed domains, oldest first."""
    found = archive.archives(from_config(config), normalize_domain(name) if name else None)
    emit([a.as_dict() for a in found], as_json=as_json,
         columns=("domain", "removed_at", "bytes", "path"), empty="no archives")


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
