"""`mailfc account add|list|show|passwd|suspend|resume|remove`."""

from __future__ import annotations

import sys

import click

from mailfc.addresses import split_address
from mailfc.cli.common import emit, json_option, pass_config, print_json, run_db, say
from mailfc.config import Config
from mailfc.db import accounts
from mailfc.errors import InvalidInput
from mailfc.passwords import hash_password

COLUMNS = ("address", "state", "quota_bytes", "created_at")


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise InvalidInput("no password on standard input")
        return password
    if not sys.stdin.isatty():
        raise InvalidInput("no password given: pipe it with --password-stdin")
    typed: str = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    return typed


@click.group("account")
def group() -> None:
    """Mail accounts (mailboxes)."""


@group.command("add")
@click.argument("address")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@click.option("--quota", "quota_bytes", type=click.IntRange(min=0), default=None,
              help="Mailbox quota in bytes.")
@json_option
@pass_config
def add(config: Config, address: str, password_stdin: bool, quota_bytes: int | None,
        as_json: bool) -> None:
    """Add an account; the password is stored as an Argon2id hash."""
    split_address(address)  # refuse a bad address before asking for a password
    hashed = hash_password(_read_password(password_stdin))
    row = run_db(config, lambda db: accounts.add(db, address, hashed, quota_bytes=quota_bytes))
    if as_json:
        print_json(row)
    else:
        say(f"account {row['address']} added")


@group.command("list")
@click.argument("domain", required=False)
@json_option
@pass_config
def list_cmd(config: Config, domain: str | None, as_json: bool) -> None:
    """List accounts, of one domain or of all."""
    rows = run_db(config, lambda db: accounts.list_all(db, domain))
    emit(rows, as_json=as_json, columns=COLUMNS, empty="no accounts")


@group.command("show")
@click.argument("address")
@json_option
@pass_config
def show(config: Config, address: str, as_json: bool) -> None:
    """Show one account."""
    emit(run_db(config, lambda db: accounts.get(db, address)), as_json=as_json)


@group.command("passwd")
@click.argument("address")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@pass_config
def passwd(config: Config, address: str, password_stdin: bool) -> None:
    """Set an account's password."""
    split_address(address)
    hashed = hash_password(_read_password(password_stdin))
    run_db(config, lambda db: accounts.set_password(db, address, hashed))
    say(f"password of {address.lower()} changed")


@group.command("suspend")
@click.argument("address")
@pass_config
def suspend(config: Config, address: str) -> None:
    """Suspend an account: it can neither log in nor send."""
    row = run_db(config, lambda db: accounts.set_state(db, address, "suspended"))
    say(f"account {row['address']} suspended")


@group.command("resume")
@click.argument("address")
@pass_config
def resume(config: Config, address: str) -> None:
    """Resume a suspended account."""
    row = run_db(config, lambda db: accounts.set_state(db, address, "active"))
    say(f"account {row['address']} active")


@group.command("remove")
@click.argument("address")
@json_option
@pass_config
def remove(config: Config, address: str, as_json: bool) -> None:
    """Remove an account from the CMDB (its maildir stays on disk)."""
    row = run_db(config, lambda db: accounts.remove(db, address))
    if as_json:
        print_json(row)
    else:
        say(f"account {row['address']} removed; its maildir was kept")
