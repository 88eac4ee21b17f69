"""Running one policy service (milter, hook server) as a process of its own.

`python -m mailfc.policy.milter` and `python -m mailfc.policy.hooks` start their
service on the configured database, print "ready" once it listens (for
whoever started the process and waits), and stop after draining on SIGTERM
or SIGINT.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import asyncpg

from mailfc import eventloop
from mailfc.config import Config, load_config
from mailfc.db import connect


class PolicyService(Protocol):
    async def start(self) -> None: ...

    async def stop(self, drain_timeout: float) -> None: ...


Factory = Callable[[Config, asyncpg.Pool, Path | None], PolicyService]


async def _run(factory: Factory, config_path: str | None, socket: str | None) -> None:
    config = load_config(config_path)
    pool = await connect(config)
    service = factory(config, pool, Path(socket) if socket else None)
    stopping = eventloop.stop_requested()
    try:
        await service.start()
        print("ready", flush=True)
        await stopping.wait()
    finally:
        await service.stop(config.runtime.stop_timeout_s)
        await pool.close()


def main(factory: Factory, prog: str, socket_default: str) -> None:
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--config", default=None)
    parser.add_argument("--socket", default=None,
                        help=f"unix socket (default: {socket_default})")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    eventloop.run(_run(factory, args.config, args.socket))
