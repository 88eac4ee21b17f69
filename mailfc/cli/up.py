"""`mailfc up`: run the whole platform on this machine until SIGTERM or Ctrl-C."""

from __future__ import annotations

import asyncio
import logging
import signal

import click

from mailfc.cli.common import pass_config
from mailfc.config import Config
from mailfc.controller.platform import SERVICE_NAMES, Platform


@click.command("up")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
@click.option("--services", default=",".join(SERVICE_NAMES), show_default=True,
              help="Comma-separated resident services to run here; a container host runs "
                   "at least the dispatcher.")
@pass_config
def group(config: Config, verbose: bool, services: str) -> None:
    """Run the platform (CMDB and every resident service) in the foreground."""
    wanted = tuple(name.strip() for name in services.split(",") if name.strip())
    unknown = set(wanted) - set(SERVICE_NAMES)
    if unknown or not wanted:
        raise click.BadParameter(
            f"unknown service(s) {', '.join(sorted(unknown)) or '(none given)'}; choose from "
            + ", ".join(SERVICE_NAMES), param_hint="--services")
    if "controller" in wanted and "dispatcher" not in wanted:
        raise click.BadParameter("the controller runs with the dispatcher of its host",
                                 param_hint="--services")
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    asyncio.run(_run(config, wanted))


async def _run(config: Config, services: tuple[str, ...]) -> None:
    platform = Platform(config, services)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await platform.start()
        logging.getLogger("mailfc").info(
            "mailfc is up (state in %s); Ctrl-C or SIGTERM stops it", config.state_dir)
        await stopping.wait()
    finally:
        logging.getLogger("mailfc").info("stopping")
        await platform.stop()
