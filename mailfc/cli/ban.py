"""`mailfc ban list|add|remove`: client addresses whose logins the routers refuse.

    mailfc ban list [--all] [--json]
    mailfc ban add 192.0.2.7 --reason "guessing, ticket 4711" [--expires 1h]
    mailfc ban add 198.51.100.0/24 --reason "botnet range"
    mailfc ban remove 192.0.2.7 [--reason "customer's office NAT"]

A ban refuses every IMAP and submission login from the address or network,
without the password being checked, on every router within
login.ban_refresh_s (mailfc.db.bans).  The routers ban an address that fails
logins for many accounts by themselves (set_by `auto`, reason "password
spraying ..."); `list` shows those too.  Every ban and unban is written to
`mailfc events` (kind ban / unban).
"""

from __future__ import annotations

import click

from mailfc.analysis.blocks import default_actor
from mailfc.cli.common import emit, json_option, pass_config, run_db, say
from mailfc.config import Config
from mailfc.db import bans
from mailfc.durations import parse_duration

COLUMNS = ("network", "reason", "set_by", "created_at", "expires_at")


@click.group("ban")
def group() -> None:
    """Addresses and networks refused at login (IMAP, submission)."""


@group.command("list")
@click.option("--all", "include_expired", is_flag=True, help="Expired bans too.")
@json_option
@pass_config
def list_cmd(config: Config, include_expired: bool, as_json: bool) -> None:
    """Active bans, newest first (set_by: auto for the routers' own, else the admin)."""
    rows = run_db(config, lambda db: bans.list_bans(db, include_expired=include_expired))
    emit(rows, as_json=as_json, columns=(*COLUMNS, "active") if include_expired else COLUMNS,
         title="login bans", empty="no bans")


@group.command("add")
@click.argument("target", metavar="ADDRESS|NETWORK")
@click.option("--reason", default="", help="Kept with the ban and in the events.")
@click.option("--expires", default=None, metavar="DURATION",
              help="Lift automatically after, e.g. 1h, 7d (default: until removed).")
@json_option
@pass_config
def add_cmd(config: Config, target: str, reason: str, expires: str | None,
            as_json: bool) -> None:
    """Refuse every login from ADDRESS or NETWORK (CIDR) on every router."""
    bans.parse_target(target)               # a typo fails before the database is opened
    expires_s = parse_duration(expires) if expires else None
    row = run_db(config, lambda db: bans.add(db, target, reason=reason, set_by=default_actor(),
                                             expires_s=expires_s))
    if as_json:
        emit(row, as_json=True)
        return
    until = f" until {row['expires_at']:%Y-%m-%d %H:%M UTC}" if row["expires_at"] else ""
    say(f"banned {row['network']}{until}")


@group.command("remove")
@click.argument("target", metavar="ADDRESS|NETWORK")
@click.option("--reason", default="", help="Kept in the events.")
@json_option
@pass_config
def remove_cmd(config: Config, target: str, reason: str, as_json: bool) -> None:
    """Lift the ban on exactly ADDRESS or NETWORK (as listed)."""
    bans.parse_target(target)
    row = run_db(config, lambda db: bans.remove(db, target, reason=reason,
                                                actor=default_actor()))
    if as_json:
        emit(row, as_json=True)
        return
    say(f"unbanned {row['network']}")
