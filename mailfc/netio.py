"""Stream plumbing shared by the dispatcher and the routers.

`splice` copies bytes both ways between two stream pairs until either side
closes, with back-pressure (a side whose peer cannot take more is not read),
and returns the byte counts.  `server_closed` waits for a closed listening
server, boundedly.  `close` closes a writer without raising, because a
peer that vanished is normal at the end of a mail session.

`send_with_fd` and `read_with_fds` pass a file descriptor over a unix
stream (SCM_RIGHTS) beside its asyncio transport, which would drop it: the
sender's transport must have nothing queued, the receiver's must be paused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

CHUNK = 65536
T = TypeVar("T")
DRAIN_AFTER_CLIENT_EOF = 10.0


@dataclass
class SpliceCount:
    client_to_server: int = 0
    server_to_client: int = 0
    # True when the server side ended the session (closed or failed) first.
    server_closed_first: bool = False
    # The server's last bytes, e.g. to see whether it said goodbye itself.
    server_tail: bytes = b""


class _Relay(asyncio.Protocol):
    """One direction's receiving end: what arrives is written to the peer transport.

    Back-pressure: when the peer cannot take more (its buffer is over the high
    water mark) asyncio calls pause_writing on the peer's protocol, which pauses
    reading on this side, so a fast sender never fills memory.
    """

    def __init__(self, peer: asyncio.Transport, count: list[int], done: asyncio.Future[str],
                 name: str, tail: bytearray | None = None) -> None:
        self.peer = peer
        self.count = count
        self.done = done
        self.name = name
        self.tail = tail
        # The transport whose bytes this relay's own transport is written with:
        # when our transport's buffer is full, that one stops being read.
        self.feeder: asyncio.ReadTransport | None = None

    def data_received(self, data: bytes) -> None:
        if self.peer.is_closing():
            return          # the other side is gone; the session is ending
        self.peer.write(data)
        self.count[0] += len(data)
        if self.tail is not None:
            self.tail += data
            del self.tail[:-512]

    def eof_received(self) -> bool:
        self._finish()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish()

    def pause_writing(self) -> None:
        if self.feeder is not None:
            self.feeder.pause_reading()

    def resume_writing(self) -> None:
        if self.feeder is not None and not self.feeder.is_closing():
            self.feeder.resume_reading()

    def _finish(self) -> None:
        if not self.done.done():
            self.done.set_result(self.name)


def take_buffer(reader: asyncio.StreamReader) -> bytes:
    # Bytes already read into the stream's buffer before the hand-over.
    buffer: bytearray = reader._buffer  # type: ignore[attr-defined]
    data = bytes(buffer)
    buffer.clear()
    return data


async def splice(
    client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter,
    server_reader: asyncio.StreamReader, server_writer: asyncio.StreamWriter,
) -> SpliceCount:
    """Relay bytes both ways until either side ends; the streams are unusable after.

    The transports are handed from the stream protocols to plain relay
    protocols: a proxy that only copies bytes does not need the streams'
    per-read coroutine, which costs more CPU than the copy itself.
    """
    loop = asyncio.get_running_loop()
    client_transport = cast(asyncio.Transport, client_writer.transport)
    server_transport = cast(asyncio.Transport, server_writer.transport)
    with contextlib.suppress(ConnectionError):
        await client_writer.drain()
        await server_writer.drain()
    up = [0]
    down = [0]
    tail = bytearray()
    upstream_done: asyncio.Future[str] = loop.create_future()
    downstream_done: asyncio.Future[str] = loop.create_future()
    from_client = _Relay(server_transport, up, upstream_done, "client")
    from_server = _Relay(client_transport, down, downstream_done, "server", tail)
    from_client.feeder = server_transport
    from_server.feeder = client_transport
    pending_client = take_buffer(client_reader)
    pending_server = take_buffer(server_reader)
    client_transport.set_protocol(from_client)
    server_transport.set_protocol(from_server)
    if pending_client:
        from_client.data_received(pending_client)
    if pending_server:
        from_server.data_received(pending_server)
    if client_reader.at_eof():
        from_client.eof_received()
    if server_reader.at_eof():
        from_server.eof_received()
    for transport in (client_transport, server_transport):
        if not transport.is_closing():
            transport.resume_reading()
    server_first = False
    try:
        done, _ = await asyncio.wait({upstream_done, downstream_done},
                                     return_when=asyncio.FIRST_COMPLETED)
        server_first = downstream_done in done and upstream_done not in done
        if upstream_done in done and not downstream_done.done():
            # The client finished sending: let the server's last replies through.
            with contextlib.suppress(OSError, RuntimeError):
                if server_transport.can_write_eof():
                    server_transport.write_eof()
            await asyncio.wait({downstream_done}, timeout=DRAIN_AFTER_CLIENT_EOF)
    finally:
        server_transport.close()
    return SpliceCount(up[0], down[0], server_first, bytes(tail))


async def run_session(sessions: set[asyncio.Task[None]], writer: asyncio.StreamWriter,
                      session: Awaitable[None], what: str, log: logging.Logger) -> None:
    """Run one client connection's session as a server's top-level task.

    The task is tracked in `sessions` (so stop() can drain and cancel them);
    an unexpected error is logged, never raised into asyncio's callback; a
    cancellation (shutdown) aborts the connection at once and ends the task
    quietly, since nothing awaits a top-level connection task.
    """
    task = asyncio.current_task()
    assert task is not None
    sessions.add(task)
    try:
        try:
            await session
        except Exception:
            log.exception("%s failed", what)
        await close(writer)
    except asyncio.CancelledError:
        writer.transport.abort()
    finally:
        sessions.discard(task)


async def close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 2.0)


async def open_connection(
    host: str, port: int, connect_timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection(host, port, limit=CHUNK * 4),
                                  connect_timeout)


async def stop_sessions(servers: Sequence[asyncio.AbstractServer],
                        sessions: set[asyncio.Task[None]], drain_timeout: float) -> None:
    """Stop accepting, let the sessions (of run_session) end within drain_timeout,
    then cancel what is left."""
    for server in servers:
        server.close()
    if sessions:
        await asyncio.wait(set(sessions), timeout=drain_timeout)
    for task in set(sessions):
        task.cancel()
    await asyncio.gather(*sessions, return_exceptions=True)


SERVER_CLOSE_WAIT_S = 2.0


async def server_closed(server: asyncio.AbstractServer) -> None:
    """Wait (at most SERVER_CLOSE_WAIT_S) for a closed server to let go.

    uvloop's Server.wait_closed() also waits for every connection the server ever
    accepted to be closed; one a peer left half-open must not hold up a stop."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(server.wait_closed(), SERVER_CLOSE_WAIT_S)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _duplicate(writer: asyncio.StreamWriter) -> socket.socket:
    # A socket object of our own on the transport's connection (uvloop's
    # transports offer no sendmsg/recvmsg); non-blocking like the original.
    try:
        fd = os.dup(writer.get_extra_info("socket").fileno())
    except (OSError, AttributeError) as error:
        # The peer closed before this (fileno -1): its end, which callers take
        # as ConnectionError, not a failure of ours (found by the fuzz suite).
        raise ConnectionError(f"connection already closed: {error}") from None
    return socket.socket(fileno=fd)


def send_with_fd(writer: asyncio.StreamWriter, data: bytes, fd: int) -> None:
    """Send `data` (small: it goes out in one call) with `fd` attached."""
    with _duplicate(writer) as conn:
        sent = socket.send_fds(conn, [data], [fd])
    if sent != len(data):
        raise ConnectionError(f"sent {sent} of {len(data)} bytes with a descriptor")


async def read_with_fds(writer: asyncio.StreamWriter, reader: asyncio.StreamReader,
                        parse: Awaitable[T]) -> tuple[T, list[int]]:
    """What `parse` reads from `reader` (whose transport is paused), fed from the
    socket here, and the descriptors that came with those bytes: the caller owns
    and closes them.  On any failure none stays open."""
    loop = asyncio.get_running_loop()
    parsed = asyncio.ensure_future(parse)
    fds: list[int] = []
    try:
        with _duplicate(writer) as conn:
            while not parsed.done():
                readable: asyncio.Future[None] = loop.create_future()
                loop.add_reader(conn.fileno(), _resolve, readable)
                try:
                    waiting: set[asyncio.Future[Any]] = {readable, parsed}
                    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    loop.remove_reader(conn.fileno())
                if not readable.done():
                    break
                try:
                    data, received, _, _ = socket.recv_fds(conn, CHUNK, 4)
                except BlockingIOError:
                    continue
                fds.extend(received)
                if not data:
                    reader.feed_eof()
                    break
                reader.feed_data(data)
                await asyncio.sleep(0)      # let the parser waiting on `reader` look
        return await parsed, fds
    except BaseException:
        parsed.cancel()
        for fd in fds:
            os.close(fd)
        raise
