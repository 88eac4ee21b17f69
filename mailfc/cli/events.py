"""`mailfc events [--domain D] [--kind K] [--since 1h] [--follow]`: the controller's decisions."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import click

from mailfc import eventloop
from mailfc.cli.common import emit, json_option, pass_config, run_db
from mailfc.config import Config
from mailfc.db import connect, events
from mailfc.durations import parse_duration

COLUMNS = ("at", "host", "domain", "service", "kind", "reason")
FOLLOW_POLL_S = 1.0


@click.command("events")
@click.option("--domain", default=None, help="Only this domain's events.")
@click.option("--kind", type=click.Choice(events.KINDS), default=None)
@click.option("--since", default=None, help="Only the last period, e.g. 15m, 1h, 1d.")
@click.option("--limit", type=click.IntRange(1, 100_000), default=200, show_default=True)
@click.option("--follow", is_flag=True, help="Keep printing new events until Ctrl-C.")
@json_option
@pass_config
def group(config: Config, domain: str | None, kind: str | None, since: str | None,
          limit: int, follow: bool, as_json: bool) -> None:
    """Show every decision the controller took, with its reason."""
    since_s = parse_duration(since) if since else None
    domain_name = domain.strip().lower() if domain else None
    rows = run_db(config, lambda db: events.recent(db, domain=domain_name, kind=kind,
                                                   since_s=since_s, limit=limit))
    if not follow:
        emit(rows, as_json=as_json, columns=COLUMNS, empty="no events")
        return
    for row in rows:
        _print(row, as_json)
    with contextlib.suppress(KeyboardInterrupt):
        eventloop.run(_follow(config, rows[-1]["id"] if rows else 0, domain_name, kind, as_json))


async def _follow(config: Config, after: int, domain: str | None, kind: str | None,
                  as_json: bool) -> None:
    pool = await connect(config)
    try:
        while True:
            for row in await events.recent(pool, domain=domain, kind=kind, after_id=after):
                _print(row, as_json)
                after = row["id"]
            await asyncio.sleep(FOLLOW_POLL_S)
    finally:
        await pool.close()


def _print(row: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({**row, "at": row["at"].isoformat()}))
        return
    where = "/".join(str(x) for x in (row["domain"], row["service"]) if x) or row["host"] or "-"
    click.echo(f"{row['at']:%Y-%m-%d %H:%M:%S} {row['kind']:<12} {where:<30} {row['reason']}")

