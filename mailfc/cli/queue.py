"""`mailfc queue list|show|retry|delete`: SMTP-In's spool, for admins.

    mailfc queue list [--domain example.org] [--json]
    mailfc queue show 5F1A2B3C4D5E6F7A8B [--json]   # envelope, per-recipient status, headers
    mailfc queue retry 5F1A2B3C4D5E6F7A8B | --all    # retry now instead of after the backoff
    mailfc queue delete 5F1A2B3C4D5E6F7A8B | --all   # drop without a bounce
"""

from __future__ import annotations

import click

from mailfc.cli.common import emit, json_option, pass_config, say
from mailfc.config import Config
from mailfc.errors import InvalidInput
from mailfc.gateways.spool import SpoolFiles, admin, spool_directory

COLUMNS = ("queue_id", "received_at", "sender", "pending", "domains", "attempts", "next_try",
           "last_error")


def _files(config: Config) -> SpoolFiles:
    return SpoolFiles(spool_directory(config.state_dir, config.spool.directory, "smtp-in"))


@click.group("queue")
def group() -> None:
    """SMTP-In's queue (the spool): messages not yet handed on."""


@group.command("list")
@click.option("--domain", default=None, help="Only messages owed to this recipient domain.")
@json_option
@pass_config
def list_command(config: Config, domain: str | None, as_json: bool) -> None:
    """Queued messages, oldest first."""
    emit(admin.list_queue(_files(config), domain), as_json=as_json, columns=COLUMNS,
         empty="the queue is empty")


@group.command("show")
@click.argument("queue_id")
@json_option
@pass_config
def show_command(config: Config, queue_id: str, as_json: bool) -> None:
    """One message: envelope, status per recipient, header."""
    emit(admin.show(_files(config), queue_id), as_json=as_json)


def _target(queue_id: str | None, every: bool) -> str:
    if bool(queue_id) == every:
        raise InvalidInput("give a queue id or --all (not both)")
    return "all" if every else str(queue_id)


@group.command("retry")
@click.argument("queue_id", required=False)
@click.option("--all", "every", is_flag=True, help="Every queued message.")
@pass_config
def retry_command(config: Config, queue_id: str | None, every: bool) -> None:
    """Deliver now instead of waiting for the next retry."""
    say(admin.request(_files(config), _target(queue_id, every), "retry"))


@group.command("delete")
@click.argument("queue_id", required=False)
@click.option("--all", "every", is_flag=True, help="Every queued message.")
@pass_config
def delete_command(config: Config, queue_id: str | None, every: bool) -> None:
    """Remove from the queue without delivering or bouncing."""
    say(admin.request(_files(config), _target(queue_id, every), "delete"))
