"""Stream plumbing shared by the dispatcher and the routers.

`splice` copies bytes both ways between two stream pairs until either side
closes, with back-pressure (each write drains before the next read), and
returns the byte counts.  `close` closes a writer without raising, because a
peer that vanished is normal at the end of a mail session.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

CHUNK = 65536
DRAIN_AFTER_CLIENT_EOF = 10.0


@dataclass
class SpliceCount:
    client_to_server: int = 0
    server_to_client: int = 0
    # True when the server side ended the session (closed or failed) first.
    server_closed_first: bool = False
    # The server's last bytes, e.g. to see whether it said goodbye itself.
    server_tail: bytes = b""


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                count: list[int], tail: bytearray | None = None) -> None:
    try:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                break
            writer.write(data)
            count[0] += len(data)
            if tail is not None:
                tail += data
                del tail[:-512]
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        # Half-close where the transport allows it, so the other side sees EOF.
        with contextlib.suppress(OSError, RuntimeError, AttributeError):
            if writer.can_write_eof():
                writer.write_eof()


async def splice(
    client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter,
    server_reader: asyncio.StreamReader, server_writer: asyncio.StreamWriter,
) -> SpliceCount:
    up = [0]
    down = [0]
    tail = bytearray()
    upstream = asyncio.create_task(_pump(client_reader, server_writer, up))
    downstream = asyncio.create_task(_pump(server_reader, client_writer, down, tail))
    server_first = False
    try:
        done, _ = await asyncio.wait({upstream, downstream}, return_when=asyncio.FIRST_COMPLETED)
        server_first = downstream in done and upstream not in done
        if upstream in done and not downstream.done():
            # The client finished sending: let the server's last replies through.
            await asyncio.wait({downstream}, timeout=DRAIN_AFTER_CLIENT_EOF)
    finally:
        for task in (upstream, downstream):
            task.cancel()
        await asyncio.gather(upstream, downstream, return_exceptions=True)
        await close(server_writer)
    return SpliceCount(up[0], down[0], server_first, bytes(tail))


async def close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 2.0)


async def open_connection(
    host: str, port: int, connect_timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection(host, port, limit=CHUNK * 4),
                                  connect_timeout)
