"""`mailfc`: the admin command of the platform.

    mailfc [--config FILE] COMMAND ...

Command groups: up, config, db, domain, account, alias, host, limit, container, abuse,
sessions, ban.  Every listing takes --json.  Errors print `Error: <cause and fix>` and
exit non-zero.
"""

from __future__ import annotations

import click

from mailfc import __version__
from mailfc.cli import (
    abuse,
    account,
    alias,
    ban,
    config_cmd,
    container,
    db_cmd,
    domain,
    events,
    host,
    limit,
    queue,
    service,
    sessions,
    status,
    up,
)
from mailfc.cli.common import MailfcGroup


@click.group(cls=MailfcGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config", "config_path", type=click.Path(dir_okay=False), default=None,
    envvar="MAILFC_CONFIG", help="TOML configuration file (default: built-in defaults).",
)
@click.version_option(__version__, prog_name="mailfc")
def cli(config_path: str | None) -> None:
    """mailfc: a Postfix and a Dovecot per mail domain, started on demand."""


for module in (config_cmd, db_cmd, domain, account, alias, host, limit, container, events,
               queue, sessions, up, abuse, ban, status, service):
    cli.add_command(module.group)


def main() -> None:
    cli(prog_name="mailfc")
