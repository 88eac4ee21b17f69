"""The event loop every mailfc process runs on: uvloop.

The resident processes spend most of their CPU moving bytes between sockets
(relays, LMTP hops, line protocols); libuv's loop does that at a fraction of the
standard loop's cost per read and write.  Tests run the same code on the
standard loop (pytest-asyncio's), so nothing depends on uvloop's behaviour.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run(main) on a new uvloop event loop."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def stop_requested() -> asyncio.Event:
    """An event set by SIGTERM or Ctrl-C (SIGINT), for a process to wait on."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    return stopping
