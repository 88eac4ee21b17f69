"""Cycling a listener: a new socket takes over, the old drains, no connection is refused."""

from __future__ import annotations

import asyncio
from typing import cast

from mailfc.gateways.listener import CyclingListener, cycle

PORT = 18055


class Echo(asyncio.Protocol):
    def __init__(self, listener: CyclingListener, generation: int) -> None:
        self.listener = listener
        self.generation = generation

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio.Transport.
        transport = cast(asyncio.Transport, transport)
        transport.write(f"{self.generation}\n".encode())
        transport.close()


async def test_cycle_refuses_no_connection() -> None:
    generation = [1]
    listener = CyclingListener("echo", "127.0.0.1", PORT,
                               lambda owner: Echo(owner, generation[0]))
    await listener.start()
    seen: list[bytes] = []
    failures: list[Exception] = []

    async def client() -> None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", PORT)
            seen.append(await reader.readline())
            writer.close()
        except OSError as error:
            failures.append(error)

    cycled = asyncio.Event()
    started = asyncio.Event()
    attempts = 0

    async def load() -> None:
        # Keep connecting before, during and after the cycle, however fast the
        # machine is, so that both generations are seen.
        nonlocal attempts
        rounds_after = 0
        while rounds_after < 5:
            await asyncio.gather(*(client() for _ in range(10)))
            attempts += 10
            if attempts >= 20:
                started.set()
            if cycled.is_set():
                rounds_after += 1

    try:
        loader = asyncio.create_task(load())
        await started.wait()
        generation[0] = 2
        listener = await cycle(listener, drain_timeout=1.0)
        cycled.set()
        await loader
    finally:
        await listener.stop(1.0)
    assert failures == []
    assert len(seen) == attempts
    assert b"1\n" in seen and b"2\n" in seen and seen[-1] == b"2\n"
