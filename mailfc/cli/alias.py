"""`mailfc alias add|list|remove`."""

from __future__ import annotations

import click

from mailfc.cli.common import emit, json_option, pass_config, print_json, run_db, say
from mailfc.config import Config
from mailfc.db import accounts


@click.group("alias")
def group() -> None:
    """Aliases: an address of a hosted domain that forwards to another address."""


@group.command("add")
@click.argument("alias")
@click.argument("destination")
@json_option
@pass_config
def add(config: Config, alias: str, destination: str, as_json: bool) -> None:
    """Add ALIAS -> DESTINATION (an alias may have several destinations)."""
    row = run_db(config, lambda db: accounts.add_alias(db, alias, destination))
    if as_json:
        print_json(row)
    else:
        say(f"alias {row['alias']} -> {row['destination']} added")


@group.command("list")
@click.argument("domain", required=False)
@json_option
@pass_config
def list_cmd(config: Config, domain: str | None, as_json: bool) -> None:
    """List aliases, of one domain or of all."""
    rows = run_db(config, lambda db: accounts.list_aliases(db, domain))
    emit(rows, as_json=as_json, columns=("alias", "destination", "created_at"),
         empty="no aliases")


@group.command("remove")
@click.argument("alias")
@click.argument("destination", required=False)
@pass_config
def remove(config: Config, alias: str, destination: str | None) -> None:
    """Remove an alias (one destination, or all when none is given)."""
    count = run_db(config, lambda db: accounts.remove_alias(db, alias, destination))
    say(f"{count} alias entr{'y' if count == 1 else 'ies'} removed")
