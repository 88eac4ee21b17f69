"""`mailfc up`: run the whole platform on this machine until SIGTERM or Ctrl-C.

Without --services, the resident services run as a few supervised processes
(mailfc.controller.supervisor), and the embedded PostgreSQL (no database.dsn) is
supervised with them: started again, with backoff, when its postmaster is gone.
With --services, exactly those run in this one process (how the supervisor starts
its children, and how a second machine runs only a dispatcher or only routers).
"""

from __future__ import annotations

import gc
import logging

import click

from mailfc import eventloop
from mailfc.cli.common import pass_config
from mailfc.config import Config
from mailfc.controller.platform import SERVICE_NAMES, Platform
from mailfc.controller.supervisor import DatabaseWatch, Supervisor
from mailfc.db.pool import embedded_cluster


@click.command("up")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
@click.option("--services", default=None,
              help="Comma-separated resident services to run in this one process (" +
                   ", ".join(SERVICE_NAMES) + "); a container host runs at least the"
                   " dispatcher.  Default: all of them, as supervised processes.")
@pass_config
@click.pass_context
def group(ctx: click.Context, config: Config, verbose: bool, services: str | None) -> None:
    """Run the platform (CMDB and every resident service) in the foreground."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    if services is None:
        config_path = ctx.find_root().params.get("config_path")
        eventloop.run(_supervise(config, config_path, verbose))
        return
    wanted = tuple(name.strip() for name in services.split(",") if name.strip())
    unknown = set(wanted) - set(SERVICE_NAMES)
    if unknown or not wanted:
        raise click.BadParameter(
            f"unknown service(s) {', '.join(sorted(unknown)) or '(none given)'}; choose from "
            + ", ".join(SERVICE_NAMES), param_hint="--services")
    if "controller" in wanted and "dispatcher" not in wanted:
        raise click.BadParameter("the controller runs with the dispatcher of its host",
                                 param_hint="--services")
    eventloop.run(_run(config, wanted))


async def _supervise(config: Config, config_path: str | None, verbose: bool) -> None:
    # The embedded PostgreSQL is supervised too (an external one is not ours).
    database = DatabaseWatch(embedded_cluster(config), config.host_name) \
        if config.uses_embedded_database else None
    supervisor = Supervisor(config_path, verbose,
                            resident_lifetime_s=config.controller.resident_lifetime_s,
                            database=database)
    stopping = eventloop.stop_requested()
    try:
        await supervisor.start()
        logging.getLogger("mailfc").info(
            "mailfc is up (state in %s, %d processes); Ctrl-C or SIGTERM stops it",
            config.state_dir, len(supervisor.children))
        await supervisor.watch(stopping)
    finally:
        logging.getLogger("mailfc").info("stopping")
        await supervisor.stop()


async def _run(config: Config, services: tuple[str, ...]) -> None:
    platform = Platform(config, services)
    stopping = eventloop.stop_requested()
    try:
        await platform.start()
        # Everything made while starting (modules, settings, pools) lives as long as
        # the process.  Out of the collector's sight, a full collection scans only
        # what sessions made since: with it, one takes 25-50 ms here (60,000 objects
        # of modules alone), a pause of every session this process serves.
        gc.collect()
        gc.freeze()
        logging.getLogger("mailfc").info(
            "mailfc is up (state in %s); Ctrl-C or SIGTERM stops it", config.state_dir)
        await stopping.wait()
    finally:
        logging.getLogger("mailfc").info("stopping")
        await platform.stop()
