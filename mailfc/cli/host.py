"""`mailfc host add|list|drain|activate`."""

from __future__ import annotations

import click

from mailfc.cli.common import emit, json_option, pass_config, print_json, run_db, say
from mailfc.config import Config
from mailfc.db import hosts

COLUMNS = ("name", "dispatcher_address", "container_subnet", "capacity", "state",
           "domains", "containers", "heartbeat_at")


@click.group("host")
def group() -> None:
    """Container hosts (one dispatcher each)."""


@group.command("add")
@click.argument("name")
@click.option("--dispatcher", "dispatcher_address", required=True,
              help="Address the routers reach this host's dispatcher at.")
@click.option("--subnet", "container_subnet", required=True,
              help="Container subnet of the host, e.g. 10.78.0.0/16.")
@click.option("--capacity", type=click.IntRange(min=0), default=1000, show_default=True,
              help="Most containers the host may run.")
@json_option
@pass_config
def add(config: Config, name: str, dispatcher_address: str, container_subnet: str,
        capacity: int, as_json: bool) -> None:
    """Register a container host."""
    ports = config.dispatcher
    row = run_db(config, lambda db: hosts.add(
        db, name, dispatcher_address, container_subnet, capacity=capacity,
        lmtp_port=ports.lmtp_port, imap_port=ports.imap_port, smtp_port=ports.smtp_port))
    if as_json:
        print_json(row)
    else:
        say(f"host {row['name']} added")


@group.command("list")
@json_option
@pass_config
def list_cmd(config: Config, as_json: bool) -> None:
    """List hosts with their domains and running containers."""
    emit(run_db(config, hosts.list_all), as_json=as_json, columns=COLUMNS, empty="no hosts")


@group.command("drain")
@click.argument("name")
@pass_config
def drain(config: Config, name: str) -> None:
    """Take no new domains; its domains move to other hosts at their next start."""
    run_db(config, lambda db: hosts.set_state(db, name, "draining"))
    say(f"host {name} is draining")


@group.command("activate")
@click.argument("name")
@pass_config
def activate(config: Config, name: str) -> None:
    """Let a drained host take domains again."""
    run_db(config, lambda db: hosts.set_state(db, name, "active"))
    say(f"host {name} is active")
