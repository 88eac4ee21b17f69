"""Readiness and exit detection without sleeping for a guessed time.

wait_listen_socket(pid, port, deadline)
    what the runtime uses: polls /proc/<pid>/net/tcp (the container's own
    network namespace) every 2 ms until the service port is in LISTEN state.
    A probe connect() would cost the server a session: Postfix logs and runs
    the milter for it, and Dovecot's one-shot imap-login process exits after
    it, which here left the next client without a greeting for seconds.

wait_listening(address, port, deadline, alive)
    (for servers the runtime did not start) connect() in a tight loop (a refused connect costs
    ~50 us on the bridge) until it is accepted, the deadline passes
    (TimeoutError) or alive() says the container's init died (ProcessLookupError).
    A connect that succeeds means the master has bound and listens: the kernel
    queues the session until a child accepts it, so it is safe to hand over.

wait_exit(pid, seconds) -> bool
    waits on a pidfd (readable when the process exits), no polling.

read_banner(address, port, seconds) -> bytes
    connect and return the first bytes the server sends (benchmarks, tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import time
from collections.abc import Callable

TCP_LISTEN = "0A"


def listening(pid: int, port: int) -> bool:
    """True when a TCP socket in `pid`'s network namespace listens on `port`.

    Reads /proc/<pid>/net/tcp{,6}: the kernel's own socket table, so nothing
    connects and no server process is spent on a probe.
    """
    wanted = f":{port:04X}"
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as handle:
                next(handle, None)
                for line in handle:
                    fields = line.split(None, 4)
                    if fields[3] == TCP_LISTEN and fields[1].endswith(wanted):
                        return True
        except (OSError, IndexError):
            continue
    return False


async def wait_listen_socket(pid: int, port: int, deadline: float, *,
                             interval: float = 0.002) -> float:
    """Poll the kernel's socket table until `port` listens; the monotonic time it did.

    Raises TimeoutError at the deadline and ProcessLookupError when `pid` exits.
    """
    checks = 0
    while not listening(pid, port):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"port {port} did not listen in time")
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


async def wait_listening(address: str, port: int, deadline: float, *,
                         interval: float = 0.002,
                         alive: Callable[[], bool] | None = None) -> float:
    """Return the monotonic time the port first accepted a connection."""
    loop = asyncio.get_running_loop()
    checks = 0
    while True:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{address}:{port} did not listen in time")
            async with asyncio.timeout(min(remaining, 1.0)):
                await loop.sock_connect(sock, (address, port))
            return time.monotonic()
        except (ConnectionRefusedError, TimeoutError) as error:
            if isinstance(error, TimeoutError) and time.monotonic() >= deadline:
                raise TimeoutError(f"{address}:{port} did not listen in time") from None
        except OSError as error:
            # No route/ARP reply yet while the veth comes up: try again.
            if error.errno not in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ECONNRESET):
                raise
        finally:
            sock.close()
        checks += 1
        if alive is not None and checks % 10 == 0 and not alive():
            raise ProcessLookupError("the container's init process exited")
        await asyncio.sleep(interval)


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


async def read_banner(address: str, port: int, seconds: float = 5.0) -> bytes:
    async with asyncio.timeout(seconds):
        reader, writer = await asyncio.open_connection(address, port)
        try:
            return await reader.read(1024)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
