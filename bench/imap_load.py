"""The IMAP command load of the benchmarks: sessions sending commands back to back.

A session logs in at host:port (a router), or, with `dovecot_pid`, is handed to
that Dovecot container through imap-master as the dispatcher does it: the
baseline "straight to Dovecot", where no password login exists.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from bench.platform import handed_over

READ_TIMEOUT_S = 30.0


async def command_rate(host: str, port: int, user: str, password: str,
                       commands: Sequence[bytes], clients: int, seconds: float,
                       dovecot_pid: int = 0, over_tcp: bool = False) -> float:
    """Commands/s of `clients` sessions that log in, SELECT INBOX, then send
    `commands` in turn for `seconds`; a refused command or a session left without
    an answer for READ_TIMEOUT_S ends the run with an error naming it."""
    deadline = time.monotonic() + seconds
    counts = [0] * clients

    async def client(index: int) -> None:
        if dovecot_pid:
            reader, writer = await asyncio.open_connection(
                sock=await handed_over(dovecot_pid, user, over_tcp=over_tcp))
        else:
            reader, writer = await asyncio.open_connection(host, port)

        async def read_line() -> bytes:
            try:
                return await asyncio.wait_for(reader.readuntil(b"\n"), READ_TIMEOUT_S)
            except TimeoutError:
                raise RuntimeError(f"session {index}: no answer within "
                                   f"{READ_TIMEOUT_S:g} s") from None

        await read_line()
        login = b"" if dovecot_pid else f'a LOGIN "{user}" "{password}"\r\n'.encode()
        writer.write(login + b"s SELECT INBOX\r\n")
        while not (line := await read_line()).startswith(b"s "):
            if line.startswith(b"a ") and not line.startswith(b"a OK"):
                raise RuntimeError(f"login failed: {line!r}")
        n = 0
        while time.monotonic() < deadline:
            tag = b"c%d" % n
            writer.write(tag + b" " + commands[n % len(commands)] + b"\r\n")
            while not (line := await read_line()).startswith(tag + b" "):
                pass
            if not line.startswith(tag + b" OK"):
                raise RuntimeError(f"command refused: {line!r}")
            n += 1
        counts[index] = n
        writer.write(b"z LOGOUT\r\n")
        writer.close()

    started = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(clients)))
    return sum(counts) / (time.monotonic() - started)
