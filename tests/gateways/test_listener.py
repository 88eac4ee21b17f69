"""Cycling a listener: a new socket takes over, the old drains, no connection is refused."""

from __future__ import annotations

import asyncio

from mailfc.gateways.listener import CyclingListener, cycle

PORT = 18055


class Echo(asyncio.Protocol):
    def __init__(self, listener: CyclingListener, generation: int) -> None:
        self.listener = listener
        self.generation = generation

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
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

    async def load() -> None:
        for _ in range(40):
            await asyncio.gather(*(client() for _ in range(10)))

    try:
        loader = asyncio.create_task(load())
        await asyncio.sleep(0.05)
        generation[0] = 2
        listener = await cycle(listener, drain_timeout=1.0)
        await loader
    finally:
        await listener.stop(1.0)
    assert failures == []
    assert len(seen) == 400
    assert b"1\n" in seen and b"2\n" in seen and seen[-1] == b"2\n"
