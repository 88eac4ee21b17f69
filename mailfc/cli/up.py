"""`mailfc up`: run the whole platform on this machine until SIGTERM or Ctrl-C."""

from __future__ import annotations

import asyncio
import logging
import signal

import click

from mailfc.cli.common import pass_config
from mailfc.config import Config
from mailfc.controller.platform import Platform


@click.command("up")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
@pass_config
def group(config: Config, verbose: bool) -> None:
    """Run the platform (CMDB and every resident service) in the foreground."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    asyncio.run(_run(config))


async def _run(config: Config) -> None:
    platform = Platform(config)
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
