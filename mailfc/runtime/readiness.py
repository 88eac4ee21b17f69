"""Readiness and exit detection without sleeping for a guessed time.

wait_listen_socket(pid, path, deadline)
    what the runtime uses: polls /proc/<pid>/net/unix (the unix sockets of the
    container's own network namespace) every 2 ms until a socket bound to the
    service's path (images.SOCKETS) is listening.  Postfix's master binds
    relative to its queue directory (private/dispatcher), so a bound name
    matches when the wanted path ends with it.  A probe connect() would cost
    the server a session: Postfix logs and runs the milter for it, and
    Dovecot's processes count it as a client.

wait_exit(pid, seconds) -> bool
    waits on a pidfd (readable when the process exits), no polling.

read_banner(path, seconds) -> bytes
    connect to a unix socket and return the first bytes the server sends
    (benchmarks, tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

# /proc/net/unix: a socket in listen() carries __SO_ACCEPTCON in its flags.
UNIX_ACCEPTING = 0x10000


def listening(pid: int, path: str) -> bool:
    """True when a unix socket in `pid`'s network namespace listens on `path`.

    Reads /proc/<pid>/net/unix: the kernel's own socket table, so nothing
    connects and no server process is spent on a probe.
    """
    try:
        with open(f"/proc/{pid}/net/unix") as handle:
            next(handle, None)
            for line in handle:
                fields = line.split(None, 7)
                if len(fields) < 8 or not int(fields[3], 16) & UNIX_ACCEPTING:
                    continue
                bound = fields[7].rstrip("\n")
                if bound == path or path.endswith("/" + bound.lstrip("/")):
                    return True
    except (OSError, ValueError):
        return False
    return False


async def wait_listen_socket(pid: int, path: str, deadline: float, *,
                             interval: float = 0.002) -> float:
    """Poll the kernel's socket table until `path` listens; the monotonic time it did.

    Raises TimeoutError at the deadline and ProcessLookupError when `pid` exits.
    """
    checks = 0
    while not listening(pid, path):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{path} did not listen in time")
        checks += 1
        if checks % 10 == 0 and not process_alive(pid):
            raise ProcessLookupError("the container's init process exited")
        await asyncio.sleep(interval)
    return time.monotonic()


def process_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            state = handle.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


async def wait_exit(pid: int, seconds: float) -> bool:
    """True when `pid` exited within `seconds`."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def exited() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(fd, exited)
    try:
        if not process_alive(pid):
            return True
        async with asyncio.timeout(seconds):
            await done
        return True
    except TimeoutError:
        return not process_alive(pid)
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def read_banner(path: str, seconds: float = 5.0) -> bytes:
    async with asyncio.timeout(seconds):
        reader, writer = await asyncio.open_unix_connection(path)
        try:
            return await reader.read(1024)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
