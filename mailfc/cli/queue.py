"""`mailfc queue`: the spools of SMTP-In and SMTP-Out, and their quarantines, for admins.

    mailfc queue list [--spool in|out] [--domain example.org] [--json|--csv]
    mailfc queue show 5F1A2B3C4D5E6F7A8B [--json]   # envelope, per-recipient status, headers
    mailfc queue retry 5F1A2B3C4D5E6F7A8B | --all    # retry now instead of after the backoff
    mailfc queue delete 5F1A2B3C4D5E6F7A8B | --all   # drop without a bounce

    mailfc queue quarantine [--spool in|out] [--json|--csv]   # bounces nobody could take
    mailfc queue quarantine show ID [--json]         # why, envelope, headers
    mailfc queue quarantine release ID               # queue it again (cause fixed)
    mailfc queue quarantine delete ID

--spool in is SMTP-In's spool (<state_dir>/spool/smtp-in: mail from outside, bounces of
inbound mail), --spool out SMTP-Out's (<state_dir>/spool/smtp-out: mail to remote
hosts); without it a listing shows both, and a command taking an id finds the spool that
holds it.  An unknown id is an error (exit status 1).  Retry and delete go through the
running service (applied within spool.scan_interval_s); release and the quarantine's
delete work on the files and need no service running.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click

from mailfc.cli.common import emit, get_config, json_option, pass_config, say
from mailfc.cli.tabular import output_options, render
from mailfc.config import Config
from mailfc.errors import InvalidInput, NotFound
from mailfc.gateways.spool import SpoolFiles, admin, spool_directory

COLUMNS = ("spool", "queue_id", "received_at", "sender", "size", "pending", "domains",
           "attempts", "next_try", "last_error")
QUARANTINE_COLUMNS = ("spool", "queue_id", "quarantined_at", "sender", "recipients", "size",
                      "reason")


@dataclass(frozen=True)
class SpoolRef:
    key: str             # "in" | "out", as --spool takes it
    service: str         # who delivers from it, for messages
    files: SpoolFiles


SPOOLS = {"in": ("smtp-in", "SMTP-In"), "out": ("smtp-out", "SMTP-Out")}

spool_option = click.option(
    "--spool", "which", type=click.Choice(sorted(SPOOLS)), default=None,
    help="in: SMTP-In's spool, out: SMTP-Out's (default: both).")


def _spools(config: Config, which: str | None) -> list[SpoolRef]:
    refs: list[SpoolRef] = []
    for key, (name, service) in SPOOLS.items():
        if which not in (None, key):
            continue
        directory = spool_directory(config.state_dir, config.spool.directory, name)
        refs.append(SpoolRef(key, service, SpoolFiles(directory)))
    return refs


def _holding(config: Config, which: str | None, queue_id: str,
             holds: Callable[[SpoolFiles, str], bool], where: str) -> list[SpoolRef]:
    """The spools with `queue_id` (in their queue or quarantine); NotFound if none."""
    refs = _spools(config, which)
    found = [ref for ref in refs if holds(ref.files, queue_id)]
    if not found:
        names = " or ".join(f"{ref.service}'s {where} ({ref.files.directory})" for ref in refs)
        listing = "mailfc queue list" if where == "queue" else "mailfc queue quarantine"
        raise NotFound(f"no message {queue_id} in {names}: see {listing}")
    return found


def _tagged(ref: SpoolRef, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"spool": ref.key, **row} for row in rows]


def _show(record: dict[str, Any], as_json: bool) -> None:
    if not as_json and isinstance(record.get("recipient_status"), list):
        record = {**record, "recipient_status": "\n".join(
            f"{item['recipient']}: {item['status']}" for item in record["recipient_status"])}
    emit(record, as_json=as_json)


@click.group("queue")
def group() -> None:
    """The spools of SMTP-In and SMTP-Out: messages not yet handed on, and quarantines."""


@group.command("list")
@spool_option
@click.option("--domain", default=None, help="Only messages owed to this recipient domain.")
@output_options
@pass_config
def list_command(config: Config, which: str | None, domain: str | None, fmt: str) -> None:
    """Queued messages, oldest first, per spool."""
    rows = [row for ref in _spools(config, which)
            for row in _tagged(ref, admin.list_queue(ref.files, domain))]
    render(rows, COLUMNS, fmt=fmt, title="queue",
           caption=None if rows else "the queue is empty")


@group.command("show")
@click.argument("queue_id")
@spool_option
@json_option
@pass_config
def show_command(config: Config, queue_id: str, which: str | None, as_json: bool) -> None:
    """One message: envelope, status per recipient, header."""
    ref = _holding(config, which, queue_id, admin.has_message, "queue")[0]
    _show({"spool": ref.key, **admin.show(ref.files, queue_id)}, as_json)


def _targets(config: Config, which: str | None, queue_id: str | None,
             every: bool) -> list[tuple[SpoolRef, str]]:
    if bool(queue_id) == every:
        raise InvalidInput("give a queue id or --all (not both)")
    if every:
        return [(ref, "all") for ref in _spools(config, which)]
    assert queue_id is not None
    return [(ref, queue_id)
            for ref in _holding(config, which, queue_id, admin.has_message, "queue")]


@group.command("retry")
@click.argument("queue_id", required=False)
@click.option("--all", "every", is_flag=True, help="Every queued message.")
@spool_option
@pass_config
def retry_command(config: Config, queue_id: str | None, every: bool,
                  which: str | None) -> None:
    """Deliver now instead of waiting for the next retry."""
    for ref, target in _targets(config, which, queue_id, every):
        say(admin.request(ref.files, target, "retry", ref.service))


@group.command("delete")
@click.argument("queue_id", required=False)
@click.option("--all", "every", is_flag=True, help="Every queued message.")
@spool_option
@pass_config
def delete_command(config: Config, queue_id: str | None, every: bool,
                   which: str | None) -> None:
    """Remove from the queue without delivering or bouncing."""
    for ref, target in _targets(config, which, queue_id, every):
        say(admin.request(ref.files, target, "delete", ref.service))


# -- the quarantine ----------------------------------------------------------------------


def _list_quarantine(config: Config, which: str | None, fmt: str) -> None:
    rows = [row for ref in _spools(config, which)
            for row in _tagged(ref, admin.list_quarantine(ref.files))]
    render(rows, QUARANTINE_COLUMNS, fmt=fmt, title="quarantine",
           caption=None if rows else "the quarantine is empty")


@group.group("quarantine", invoke_without_command=True)
@spool_option
@output_options
@click.pass_context
def quarantine_group(ctx: click.Context, which: str | None, fmt: str) -> None:
    """Bounces that failed for good (spool.undeliverable_bounces): list, release, delete."""
    if ctx.invoked_subcommand is None:
        _list_quarantine(get_config(ctx), which, fmt)


@quarantine_group.command("list")
@spool_option
@output_options
@pass_config
def quarantine_list(config: Config, which: str | None, fmt: str) -> None:
    """Quarantined messages, oldest first, per spool."""
    _list_quarantine(config, which, fmt)


@quarantine_group.command("show")
@click.argument("queue_id")
@spool_option
@json_option
@pass_config
def quarantine_show(config: Config, queue_id: str, which: str | None, as_json: bool) -> None:
    """One quarantined message: why, envelope, header."""
    ref = _holding(config, which, queue_id, admin.is_quarantined, "quarantine")[0]
    _show({"spool": ref.key, **admin.show_quarantined(ref.files, queue_id)}, as_json)


@quarantine_group.command("release")
@click.argument("queue_id")
@spool_option
@pass_config
def quarantine_release(config: Config, queue_id: str, which: str | None) -> None:
    """Queue it again for the recipients that failed (after fixing the cause)."""
    for ref in _holding(config, which, queue_id, admin.is_quarantined, "quarantine"):
        say(admin.release(ref.files, queue_id, ref.service))


@quarantine_group.command("delete")
@click.argument("queue_id")
@spool_option
@pass_config
def quarantine_delete(config: Config, queue_id: str, which: str | None) -> None:
    """Remove it for good."""
    for ref in _holding(config, which, queue_id, admin.is_quarantined, "quarantine"):
        say(admin.delete_quarantined(ref.files, queue_id))
