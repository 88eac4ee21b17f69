"""`mailfc host add|list|drain|activate`.

A host added here is "pending": no domain is placed on it until its
dispatcher first reports (its heartbeat, from `mailfc up` there); then it is
"active".

`host add` also issues the new host's cluster credentials (mailfc.cluster):
the cluster CA certificate and a certificate + key for the host, signed by
the CA (which is created on this host if it has none yet), written into
--credentials (default <state_dir>/cluster/hosts/NAME, mode 0700).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import click

from mailfc import cluster
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
@click.option("--credentials", "credentials_dir", type=click.Path(file_okay=False),
              default=None, help="Directory for the host's cluster credentials (CA "
              "certificate, its certificate and key).  Default: "
              "<state_dir>/cluster/hosts/NAME.")
@json_option
@pass_config
def add(config: Config, name: str, dispatcher_address: str, container_subnet: str,
        capacity: int, credentials_dir: str | None, as_json: bool) -> None:
    """Register a container host and issue its cluster credentials.

    The new host's dispatcher accepts routers of other hosts only with a
    certificate of this cluster, and its routers need one to reach the
    others: copy the files written here to the new host and point its
    [cluster] keys at them (printed below)."""
    directory = Path(credentials_dir) if credentials_dir else \
        cluster.cluster_dir(config) / "hosts" / name
    ports = config.dispatcher

    async def register(db: asyncpg.Connection) -> tuple[dict[str, Any], cluster.Credentials]:
        # One transaction: no row without its credentials.
        async with db.transaction():
            row = await hosts.add(
                db, name, dispatcher_address, container_subnet, capacity=capacity,
                lmtp_port=ports.lmtp_port, imap_port=ports.imap_port,
                smtp_port=ports.smtp_port)
            written = await asyncio.to_thread(
                cluster.issue_for_host, config, name, dispatcher_address, directory)
        return row, written

    row, written = run_db(config, register)
    if as_json:
        print_json({**row, "credentials": {"ca_file": str(written.ca),
                                           "cert_file": str(written.cert),
                                           "key_file": str(written.key)}})
        return
    # click.echo, not say: rich would take "[cluster]" for markup.
    click.echo(f"host {row['name']} added, pending: no domain is placed on it until it"
        " first reports (start `mailfc up` there)\n"
        f"Its cluster credentials are in {directory}:\n"
        f"  {written.ca.name:9} the cluster CA certificate\n"
        f"  {written.cert.name:9} {name}'s certificate\n"
        f"  {written.key.name:9} its private key (keep it secret: mode 0600)\n"
        f"Copy them to {name} (e.g. with scp -p, into a directory only root reads) and set "
        f"there, with the paths where you put them:\n"
        f"  [cluster]\n"
        f'  ca_file = "{written.ca}"\n'
        f'  cert_file = "{written.cert}"\n'
        f'  key_file = "{written.key}"\n'
        f"  [host]\n"
        f'  name = "{name}"\n'
        f"  [dispatcher]\n"
        f'  address = "{dispatcher_address}"')


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
