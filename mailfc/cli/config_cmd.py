"""`mailfc config show`: the effective configuration."""

from __future__ import annotations

import click

from mailfc.cli.common import json_option, pass_config, print_json
from mailfc.config import Config, render_toml


@click.group("config")
def group() -> None:
    """Show the configuration."""


@group.command("show")
@json_option
@pass_config
def show(config: Config, as_json: bool) -> None:
    """Print the effective configuration (defaults included) as TOML."""
    if as_json:
        print_json(config.model_dump())
    else:
        click.echo(render_toml(config), nl=False)
