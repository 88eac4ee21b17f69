"""`mailfc`: the admin command of the platform.

    mailfc [--config FILE] COMMAND ...

Command groups: up, config, db, domain, account, alias, host, limit, container, abuse,
sessions, ban.  Every listing takes --json.  Errors print `Error: <cause and fix>` and
exit non-zero.
"""

from __future__ import annotations

import importlib

import click

from mailfc import __version__
from mailfc.cli.common import MailfcGroup

# Each command's module, imported only when the command runs (or --help lists them):
# importing all of them (pyroute2, the filter chain, dnspython, ...) cost every
# `mailfc abuse top` about a second before it could connect.
COMMANDS = {
    "abuse": "abuse", "account": "account", "alias": "alias", "ban": "ban",
    "config": "config_cmd", "container": "container", "db": "db_cmd", "domain": "domain",
    "events": "events", "host": "host", "limit": "limit", "queue": "queue",
    "service": "service", "sessions": "sessions", "status": "status", "up": "up",
}


class LazyGroup(MailfcGroup):
    """click's lazily loading group (its documented LazyGroup pattern)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = COMMANDS.get(cmd_name)
        if module is None:
            return None
        command: click.Command = importlib.import_module(f"mailfc.cli.{module}").group
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config", "config_path", type=click.Path(dir_okay=False), default=None,
    envvar="MAILFC_CONFIG", help="TOML configuration file (default: built-in defaults).",
)
@click.version_option(__version__, prog_name="mailfc")
def cli(config_path: str | None) -> None:
    """mailfc: a Postfix and a Dovecot per mail domain, started on demand."""


def main() -> None:
    cli(prog_name="mailfc")
