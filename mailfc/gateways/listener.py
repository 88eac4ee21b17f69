"""Listeners of resident services that can be replaced without refusing a connection.

CYCLING
    cycle() opens a new listening socket on the same address (SO_REUSEPORT), steers every
    new connection to it, lets the old socket hand over the connections already waiting
    in its accept queue, closes it, and lets the old sessions finish (drain).  The new
    socket gets the new connections from the first moment on.

    Steering: Linux spreads connections over a SO_REUSEPORT group by a hash, so the old
    socket would keep getting some until it closes, and closing a socket resets what sits
    in its accept queue.  A classic BPF program attached to the group
    (SO_ATTACH_REUSEPORT_CBPF, `return 1`: the second socket, i.e. the new one) sends all
    new connections to the new socket first; once the old one has closed, index 1 no
    longer exists and the kernel falls back to its hash over the one socket left.

    The same works across processes (a new process binds, an old one drains), as long
    as both run as the same user.

DRAINING
    stop()/cycle() wait up to drain_timeout for open sessions to end by themselves, then
    close the rest (SMTP: the session's protocol says 421 first).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import socket
import time
from collections.abc import Callable

log = logging.getLogger("mailfc.gateways.listener")

SO_ATTACH_REUSEPORT_CBPF = 51
BPF_RET_K = 0x06


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def steer_to(sock: socket.socket, index: int) -> bool:
    """Send new connections of sock's SO_REUSEPORT group to the group's socket `index`."""
    program = (_SockFilter * 1)(_SockFilter(BPF_RET_K, 0, 0, index))
    fprog = _SockFprog(1, ctypes.cast(program, ctypes.POINTER(_SockFilter)))
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, bytes(fprog))
    except OSError as error:
        log.warning("cannot steer connections to the new listener (%s): a connection "
                    "arriving during the switch may be reset", error)
        return False
    return True


def listening_socket(host: str, port: int, backlog: int = 1024) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Connection:
    """What a listener needs of a session to drain it: is it open, how to end it."""

    def close_for_shutdown(self) -> None:
        raise NotImplementedError


class CyclingListener:
    """Serves `factory` on host:port; `connections` holds the sessions of this generation."""

    def __init__(self, name: str, host: str, port: int,
                 factory: Callable[[CyclingListener], asyncio.Protocol]) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.factory = factory
        self.server: asyncio.Server | None = None
        self.connections: set[Connection] = set()
        self.started_at = 0.0
        self._drained = asyncio.Event()
        self._drained.set()

    def attach(self, connection: Connection) -> None:
        self.connections.add(connection)
        self._drained.clear()

    def detach(self, connection: Connection) -> bool:
        """False when the connection was not (or no longer) one of ours."""
        if connection not in self.connections:
            return False
        self.connections.discard(connection)
        if not self.connections:
            self._drained.set()
        return True

    async def start(self) -> None:
        sock = listening_socket(self.host, self.port)
        loop = asyncio.get_running_loop()
        try:
            self.server = await loop.create_server(lambda: self.factory(self), sock=sock)
        except BaseException:
            sock.close()
            raise
        self.started_at = time.monotonic()

    def steer_here(self) -> None:
        assert self.server is not None
        for sock in self.server.sockets:
            # The socket object asyncio hands out is a transport socket wrapper;
            # setsockopt on it works on the real descriptor.
            steer_to(sock, 1)

    async def stop(self, drain_timeout: float) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(drain_timeout):     # see Recorder._run
                await self._drained.wait()
        for connection in list(self.connections):
            connection.close_for_shutdown()
        if self.connections:
            await asyncio.sleep(0.1)


async def cycle(old: CyclingListener, drain_timeout: float) -> CyclingListener:
    """Start a successor of `old` on the same address, hand over, drain `old`."""
    new = CyclingListener(old.name, old.host, old.port, old.factory)
    await new.start()
    new.steer_here()
    # Connections that reached the old socket's accept queue before the steering are
    # accepted by its reader callback on the next loop turns; then it can close.
    await asyncio.sleep(0.05)
    await old.stop(drain_timeout)
    log.info("%s: listener replaced (the old one served %.0fs)", old.name,
             time.monotonic() - old.started_at)
    return new
