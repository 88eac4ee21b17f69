"""`python -m mailfc.policy.hooks [--config FILE] [--socket PATH]`: the hook server alone.

`mailfc up` runs the hook server with the other resident services; this entry point
runs it as a process of its own (e.g. to restart it while Dovecot keeps running: the
plugins reconnect and announce their sessions again).  Prints "ready" once it listens;
stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from mailfc.config import load_config
from mailfc.db import connect
from mailfc.policy.hooks.server import HookService


async def _run(config_path: str | None, socket: str | None) -> None:
    config = load_config(config_path)
    pool = await connect(config)
    service = HookService(config, pool, socket=Path(socket) if socket else None)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await service.start()
        print("ready", flush=True)     # for whoever started us and waits
        await stopping.wait()
    finally:
        await service.stop(config.runtime.stop_timeout_s)
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m mailfc.policy.hooks")
    parser.add_argument("--config", default=None)
    parser.add_argument("--socket", default=None, help="unix socket (default: hooks.socket)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(_run(args.config, args.socket))


if __name__ == "__main__":
    main()
