"""Resident cycling under `mailfc up`: processes are replaced, no connection is refused."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import time
from pathlib import Path

import asyncpg

from mailfc.config import Config
from mailfc.db.pool import embedded_cluster
from tests.routers.test_up import start_up, stop_up, wait_port

BASE = 24000


def knock(port: int, seconds: float) -> tuple[int, int]:
    """Connect again and again for `seconds`: (greeted, refused or cut)."""
    greeted = failed = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                if sock.recv(100).startswith(b"* OK"):
                    greeted += 1
                    sock.sendall(b"a LOGOUT\r\n")
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
    ports = {name: BASE + index for index, name in enumerate((
        "lmtp_router", "imap_router", "imap_router_tls", "submission", "submissions",
        "smtp_in", "filter_in", "smtp_out", "milter", "hook_server"))}
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
filter_out = "bridge:{BASE + 20}"
[dispatcher]
lmtp_port = {BASE + 21}
imap_port = {BASE + 22}
smtp_port = {BASE + 23}
[runtime]
name_prefix = "mfcy"
[controller]
resident_lifetime_s = 3.0
""")
    process = await asyncio.to_thread(start_up, config, own / "up.log")
    try:
        await asyncio.to_thread(wait_port, ports["submission"], process, 60, own / "up.log")
        greeted, failed = await asyncio.to_thread(knock, ports["imap_router"], 12.0)
        log = await asyncio.to_thread((own / "up.log").read_text)
        replaced = re.findall(r"routers process replaced \(pid (\d+) -> (\d+)\)", log)
        assert replaced, log[-3000:]
        assert greeted > 50 and failed == 0, (greeted, failed)
    finally:
        if process.poll() is None:
            assert await asyncio.to_thread(stop_up, process) == 0
        await asyncio.to_thread(subprocess.run, ["ip", "link", "del", "mfcy0"],
                                capture_output=True, check=False)
