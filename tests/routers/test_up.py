"""`mailfc up` as an admin runs it: a real process, real clients, SIGTERM stops it cleanly."""

from __future__ import annotations

import asyncio
import imaplib
import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from mailfc.config import Config
from mailfc.db import accounts, domains
from mailfc.db.pool import embedded_cluster
from mailfc.passwords import hash_password
from tests.routers.conftest import PASSWORD, client_tls

IMAP_PORT, IMAPS_PORT = 19143, 19993


def wait_port(port: int, process: subprocess.Popen[bytes], timeout: float,
              log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "mailfc up exited early:\n" + log.read_text()[-3000:]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"mailfc up did not listen on {port} within {timeout}s")


def start_up(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as handle:
        return subprocess.Popen([sys.executable, "-m", "mailfc", "--config", str(config), "up"],
                                stdout=handle, stderr=subprocess.STDOUT, env={**os.environ})


def stop_up(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


@pytest.fixture(scope="module")
async def platform_up(state_dir: Path, cmdb: asyncpg.Pool, mailfc_config: Config
                      ) -> AsyncIterator[subprocess.Popen[bytes]]:
    # Its own state directory (sockets, bundles, maildirs), the session's database.
    own_state = state_dir / "up"
    own_state.mkdir(exist_ok=True)
    own_state.chmod(0o711)
    config = own_state / "up.toml"
    config.write_text(f"""
[paths]
state_dir = "{own_state}"
[database]
dsn = "{embedded_cluster(mailfc_config).dsn}"
[host]
name = "up-host"
[network]
bridge = "mfcu0"
subnet = "10.90.0.0/24"
[listen]
imap_router = "127.0.0.1:{IMAP_PORT}"
imap_router_tls = "127.0.0.1:{IMAPS_PORT}"
milter = "127.0.0.1:19030"
hook_server = "127.0.0.1:19031"
smtp_in = "127.0.0.1:19025"
submission = "127.0.0.1:19588"
submissions = "127.0.0.1:19465"
[dispatcher]
lmtp_port = 19124
imap_port = 19243
smtp_port = 19587
[runtime]
name_prefix = "mfcu"
""")
    async with cmdb.acquire() as db:
        if not await db.fetchval("SELECT 1 FROM domains WHERE name = 'up.example'"):
            await domains.add(db, "up.example")
            await accounts.add(db, "gina@up.example", hash_password(PASSWORD))
    process = await asyncio.to_thread(start_up, config, own_state / "up.log")
    try:
        await asyncio.to_thread(wait_port, IMAPS_PORT, process, 60, own_state / "up.log")
        await cmdb.execute(
            "UPDATE domains SET host_id = (SELECT id FROM hosts WHERE name = 'up-host')"
            " WHERE name = 'up.example'")
        yield process
    finally:
        if process.poll() is None:
            await asyncio.to_thread(stop_up, process)
        await asyncio.to_thread(subprocess.run, ["ip", "link", "del", "mfcu0"],
                                capture_output=True, check=False)


async def test_up_serves_lmtp_and_imap_and_stops_on_sigterm(
        platform_up: subprocess.Popen[bytes], cmdb: asyncpg.Pool, state_dir: Path) -> None:
    def deliver() -> dict[str, tuple[int, bytes]]:
        # The LMTP Router's default socket (listen.lmtp_router, mailfc.hops).
        socket = state_dir / "up" / "private" / "hops" / "lmtp-router.sock"
        with smtplib.LMTP(str(socket), timeout=30) as client:
            return client.sendmail("someone@remote.example", ["gina@up.example"],
                                   b"Subject: via mailfc up\r\n\r\nhello\r\n")

    assert await asyncio.to_thread(deliver) == {}

    def read() -> bytes:
        client = imaplib.IMAP4_SSL("127.0.0.1", IMAPS_PORT, ssl_context=client_tls(),
                                   timeout=30)
        client.login("gina@up.example", PASSWORD)
        client.select("INBOX")
        _, found = client.search(None, "SUBJECT", '"via mailfc up"')
        client.logout()
        return found[0]

    assert (await asyncio.to_thread(read)).strip()
    running = await cmdb.fetchval(
        "SELECT count(*) FROM container_instances c JOIN hosts h ON h.id = c.host_id"
        " WHERE h.name = 'up-host' AND c.state = 'running'")
    assert running == 1

    assert await asyncio.to_thread(stop_up, platform_up) == 0
    # Its containers were drained and stopped with it.
    left = await cmdb.fetchval(
        "SELECT count(*) FROM container_instances c JOIN hosts h ON h.id = c.host_id"
        " WHERE h.name = 'up-host' AND c.state <> 'stopped'")
    assert left == 0
    log = await asyncio.to_thread((state_dir / "up" / "up.log").read_text)
    assert "Traceback" not in log
