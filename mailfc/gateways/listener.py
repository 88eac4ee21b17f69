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

UNIX SOCKETS
    With `path`, the listener serves a unix socket there instead (mode 0666: the
    directory it is in decides who may reach it).  It binds a temporary name beside the
    path and renames it over the path: a client connecting meanwhile finds the old
    socket or the new one, never none.  That is how a successor (cycle(), or a new
    process) takes over; the old socket, no longer reachable by its name, hands over
    what waits in its accept queue and drains as above.  Stopping, a listener removes
    the path only while it still names the socket it bound (the inode), never a
    successor's.

PEER CHECK
    `admit`, when given, sees every accepted connection before its protocol does
    (before any greeting): it returns None to let the peer in, or why not, and the
    connection is then closed at once and the reason logged.  It may return an
    awaitable (a check that reads /proc or asks the CMDB); until it is decided what the
    peer sends is held (at most MAX_EARLY_INPUT) and then handed to the protocol.
    mailfc.peers.root_or_own_user is the internal hops' check (SO_PEERCRED).

TLS
    With `tls`, a TCP listener's connections are TLS from the first byte (the internal
    hops between hosts: mutual TLS, mailfc.cluster); the protocol sees a connection
    once its handshake is complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import secrets
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

log = logging.getLogger("mailfc.gateways.listener")

SO_ATTACH_REUSEPORT_CBPF = 51
BPF_RET_K = 0x06
# What a peer may send while `admit` decides about it.
MAX_EARLY_INPUT = 64 * 1024
TLS_HANDSHAKE_TIMEOUT_S = 10.0

# None: let the peer in; a text: why not.  See PEER CHECK.
PeerCheck = Callable[[asyncio.BaseTransport], "str | Awaitable[str | None] | None"]


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


def unix_listening_socket(path: Path, backlog: int = 1024) -> tuple[socket.socket, int]:
    """A listening socket put at `path` by an atomic rename, and its inode."""
    # A short name: a unix socket's path has room for 107 bytes.
    temporary = path.with_name(f".{os.getpid()}.{secrets.token_hex(4)}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(temporary))
        os.chmod(temporary, 0o666)
        sock.listen(backlog)
        sock.setblocking(False)
        inode = os.stat(temporary).st_ino
        os.replace(temporary, path)
    except BaseException:
        sock.close()
        temporary.unlink(missing_ok=True)
        raise
    return sock, inode


class _Gate(asyncio.Protocol):
    """A connection's protocol until the listener's `admit` has let the peer in."""

    def __init__(self, listener: CyclingListener) -> None:
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.early = bytearray()
        self.eof = False
        self.lost = False
        self.paused = False
        self.deciding: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        assert self.listener.admit is not None
        try:
            verdict = self.listener.admit(transport)
        except Exception as error:
            verdict = f"the peer check failed: {error}"
        if isinstance(verdict, str) or verdict is None:
            self._settle(verdict)
            return
        transport.pause_reading()  # type: ignore[attr-defined]
        self.paused = True
        # The loop keeps only a weak reference to a task.
        self.deciding = asyncio.ensure_future(self._decide(verdict))

    async def _decide(self, verdict: Awaitable[str | None]) -> None:
        try:
            reason = await verdict
        except asyncio.CancelledError:
            raise
        except Exception as error:
            reason = f"the peer check failed: {error}"
        self._settle(reason)

    def _settle(self, reason: str | None) -> None:
        transport = self.transport
        assert transport is not None
        if self.lost:
            return
        if reason is None and self.listener.server is None:
            reason = "the listener is stopping"
        if reason is not None:
            log.warning("%s: refused a connection: %s", self.listener.name, reason)
            transport.abort()
            return
        protocol = self.listener.factory(self.listener)
        transport.set_protocol(protocol)
        if self.paused:
            # Before the protocol starts: it may pause reading for reasons of its own.
            transport.resume_reading()
        protocol.connection_made(transport)
        if self.early:
            protocol.data_received(bytes(self.early))
        if self.eof and not protocol.eof_received():
            transport.close()

    def data_received(self, data: bytes) -> None:
        self.early += data
        if len(self.early) > MAX_EARLY_INPUT and self.transport is not None:
            self.transport.abort()

    def eof_received(self) -> bool:
        self.eof = True
        return True     # half open until decided

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True


class CyclingListener:
    """Serves `factory` on host:port (or the unix socket `path`); `connections` holds
    the sessions of this generation."""

    def __init__(self, name: str, host: str, port: int,
                 factory: Callable[[CyclingListener], asyncio.Protocol], *,
                 path: Path | None = None, admit: PeerCheck | None = None,
                 tls: ssl.SSLContext | None = None) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.path = path
        self.admit = admit
        self.tls = tls
        self._bound_inode = 0
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
        loop = asyncio.get_running_loop()
        if self.path is not None:
            sock, self._bound_inode = unix_listening_socket(self.path)
        else:
            sock = listening_socket(self.host, self.port)
        try:
            if self.path is not None:
                self.server = await loop.create_unix_server(self._protocol, sock=sock)
            else:
                self.server = await loop.create_server(
                    self._protocol, sock=sock, ssl=self.tls,
                    ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT_S if self.tls else None)
        except BaseException:
            sock.close()
            raise
        self.started_at = time.monotonic()

    def _protocol(self) -> asyncio.Protocol:
        return self.factory(self) if self.admit is None else _Gate(self)

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
            with contextlib.suppress(FileNotFoundError):
                if self.path is not None and os.stat(self.path).st_ino == self._bound_inode:
                    self.path.unlink()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(drain_timeout):     # see Recorder._run
                await self._drained.wait()
        for connection in list(self.connections):
            connection.close_for_shutdown()
        if self.connections:
            await asyncio.sleep(0.1)


async def cycle(old: CyclingListener, drain_timeout: float) -> CyclingListener:
    """Start a successor of `old` on the same address, hand over, drain `old`."""
    new = CyclingListener(old.name, old.host, old.port, old.factory, path=old.path,
                          admit=old.admit, tls=old.tls)
    await new.start()
    if new.path is None:
        new.steer_here()
    # Connections that reached the old socket's accept queue before the steering (or
    # the rename) are accepted by its reader callback on the next loop turns; then it
    # can close.
    await asyncio.sleep(0.05)
    await old.stop(drain_timeout)
    log.info("%s: listener replaced (the old one served %.0fs)", old.name,
             time.monotonic() - old.started_at)
    return new
