"""Resident cycling under `mailfc up`: processes are replaced, no connection is refused."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg

from mailfc.config import Config
from mailfc.db.pool import embedded_cluster
from tests.routers.test_up import start_up, stop_up, wait_port

BASE = 24000


def knock(port: int, seconds: float) -> tuple[int, int]:
    """Connect again and again for `seconds`: (greeted, refused or cut)."""
    return knock_at(lambda: socket.create_connection(("127.0.0.1", port), timeout=5),
                    b"* OK", b"a LOGOUT\r\n", seconds)


def knock_unix(path: Path, seconds: float) -> tuple[int, int]:
    """knock() on an internal hop's unix socket (an LMTP greeting)."""
    def connect() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        try:
            sock.connect(str(path))
        except OSError:
            sock.close()
            raise
        return sock

    return knock_at(connect, b"220 ", b"QUIT\r\n", seconds)


def knock_at(connect: Callable[[], socket.socket], greeting: bytes, goodbye: bytes,
             seconds: float) -> tuple[int, int]:
    greeted = failed = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with connect() as sock:
                if sock.recv(100).startswith(greeting):
                    greeted += 1
                    sock.sendall(goodbye)
                else:
                    failed += 1
        except OSError:
            failed += 1
        time.sleep(0.02)
    return greeted, failed


async def test_routers_are_replaced_without_refusing_a_connection(
        state_dir: Path, cmdb: asyncpg.Pool, mailfc_config: Config) -> None:
    own = state_dir / "cycling"
    own.mkdir(exist_ok=True)
    own.chmod(0o711)
    config = own / "mailfc.toml"
    # The internal hops (LMTP Router, SMTP-Out) on their default unix sockets.
    ports = {name: BASE + index for index, name in enumerate((
        "imap_router", "imap_router_tls", "submission", "submissions", "smtp_in",
        "milter", "hook_server"))}
    listen = "\n".join(f'{name} = "127.0.0.1:{port}"' for name, port in ports.items())
    config.write_text(f"""
[paths]
state_dir = "{own}"
[database]
dsn = "{embedded_cluster(mailfc_config).dsn}"
[host]
name = "cycling-host"
[network]
bridge = "mfcy0"
subnet = "10.97.0.0/24"
[listen]
{listen}
[dispatcher]
lmtp_port = {BASE + 21}
imap_port = {BASE + 22}
smtp_port = {BASE + 23}
[runtime]
name_prefix = "mfcy"
[controller]
resident_lifetime_s = 3.0
# Knocking 50 times a second from loopback: this test is about cycling, not the caps.
[imap_router_connections]
exempt_networks = ["127.0.0.0/8"]
""")
    process = await asyncio.to_thread(start_up, config, own / "up.log")
    try:
        await asyncio.to_thread(wait_port, ports["submission"], process, 60, own / "up.log")
        (greeted, failed), (lmtp_greeted, lmtp_failed) = await asyncio.gather(
            asyncio.to_thread(knock, ports["imap_router"], 12.0),
            asyncio.to_thread(knock_unix, own / "private" / "hops" / "lmtp-router.sock",
                              12.0))
        log = await asyncio.to_thread((own / "up.log").read_text)
        replaced = re.findall(r"routers process replaced \(pid (\d+) -> (\d+)\)", log)
        assert replaced, log[-3000:]
        assert greeted > 50 and failed == 0, (greeted, failed)
        # The LMTP Router's unix socket is taken over by rename, never missing.
        assert lmtp_greeted > 50 and lmtp_failed == 0, (lmtp_greeted, lmtp_failed)
    finally:
        if process.poll() is None:
            assert await asyncio.to_thread(stop_up, process) == 0
        await asyncio.to_thread(subprocess.run, ["ip", "link", "del", "mfcy0"],
                                capture_output=True, check=False)
