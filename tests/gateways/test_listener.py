"""Cycling a listener: a new socket takes over, the old drains, no connection is refused."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import cast

import pytest

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


@pytest.mark.parametrize("form", ["tcp", "unix"])
async def test_cycle_refuses_no_connection(form: str, tmp_path: Path) -> None:
    generation = [1]
    path = tmp_path / "echo.sock" if form == "unix" else None
    listener = CyclingListener("echo", "127.0.0.1", PORT,
                               lambda owner: Echo(owner, generation[0]), path=path)
    await listener.start()
    seen: list[bytes] = []
    failures: list[Exception] = []

    async def client() -> None:
        try:
            if path is not None:
                reader, writer = await asyncio.open_unix_connection(str(path))
            else:
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
    if path is not None:
        # The old listener, stopping, left its successor's socket in place; the
        # successor, stopped, removed it; no temporary name was left behind.
        assert not path.exists() and os.listdir(tmp_path) == []


async def test_a_stopping_listener_leaves_its_successors_socket(tmp_path: Path) -> None:
    """A new process binds the path anew (by rename); the old one then stops."""
    path = tmp_path / "hop.sock"
    old = CyclingListener("old", "", 0, lambda owner: Echo(owner, 1), path=path)
    new = CyclingListener("new", "", 0, lambda owner: Echo(owner, 2), path=path)
    await old.start()
    await new.start()
    await old.stop(1.0)
    try:
        reader, writer = await asyncio.open_unix_connection(str(path))
        assert await reader.readline() == b"2\n"
        writer.close()
    finally:
        await new.stop(1.0)
    assert not path.exists()
