"""`mailfc up` supervises the embedded PostgreSQL: kill -9 of its postmaster heals
by itself, nobody runs `pg_ctl start`.

The supervisor runs here with one child process (the LMTP Router, whose RCPT asks
the database) on a cluster of its own in its own state directory, so killing that
cluster's postmaster touches nothing of the other tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import smtplib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from mailfc.config import parse_config
from mailfc.controller.supervisor import DatabaseWatch, Supervisor
from mailfc.db import accounts, domains
from mailfc.db.embedded import EmbeddedCluster
from mailfc.db.pool import embedded_cluster
from mailfc.passwords import hash_password
from tests.conftest import require_binary

DOMAIN = "dbwatch.example"


@dataclass
class Supervised:
    supervisor: Supervisor
    watch: DatabaseWatch
    cluster: EmbeddedCluster
    lmtp_socket: Path


@pytest.fixture(scope="module")
async def supervised(state_dir: Path) -> AsyncIterator[Supervised]:
    require_binary("pg_ctl", "postgresql")
    own = state_dir / "dbwatch"
    own.mkdir(exist_ok=True)
    own.chmod(0o711)
    config_file = own / "mailfc.toml"
    config_file.write_text(f'[paths]\nstate_dir = "{own}"\n[host]\nname = "dbwatch-host"\n')
    config = parse_config({"paths": {"state_dir": str(own)},
                           "host": {"name": "dbwatch-host"}}, "dbwatch")
    cluster = embedded_cluster(config)
    watch = DatabaseWatch(cluster, config.host_name, check_s=0.5)
    supervisor = Supervisor(str(config_file), False, database=watch,
                            groups=(("routers", ("lmtp-router",)),))
    stop = asyncio.Event()
    await supervisor.start()        # the child creates and starts the cluster
    watching = asyncio.create_task(supervisor.watch(stop))
    try:
        pool = await asyncpg.create_pool(cluster.dsn, min_size=1, max_size=2)
        async with pool.acquire() as db:
            await domains.add(db, DOMAIN)
            await accounts.add(db, f"kim@{DOMAIN}", hash_password("dbwatch-password"))
        await pool.close()
        yield Supervised(supervisor, watch, cluster, config.hops_dir / "lmtp-router.sock")
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(watching, 30)
        await supervisor.stop()
        with contextlib.suppress(Exception):   # after a failure it may be down already
            await asyncio.to_thread(cluster.stop)


def rcpt(socket: Path, recipient: str) -> int:
    """The LMTP Router's answer to RCPT (it asks the database for the recipient)."""
    with smtplib.LMTP(str(socket), timeout=30) as client:
        client.ehlo("dbwatch.test")
        client.mail("someone@remote.example")
        return client.rcpt(recipient)[0]


async def test_a_killed_postmaster_is_started_again_without_anyone(
        supervised: Supervised) -> None:
    cluster, socket = supervised.cluster, supervised.lmtp_socket
    assert await asyncio.to_thread(rcpt, socket, f"kim@{DOMAIN}") == 250
    lost = cluster.postmaster_pid()
    assert lost is not None and cluster.postmaster_alive()
    os.kill(lost, signal.SIGKILL)
    killed_at = time.monotonic()
    while cluster.postmaster_alive():        # a zombie counts as dead
        assert time.monotonic() - killed_at < 10, "the postmaster did not die"
        await asyncio.sleep(0.01)
    codes = []
    # Each question a recipient never asked before (the router remembers answers for
    # a few seconds): only the database can answer it.  A temporary failure while it
    # is down; a backend that has not yet noticed its postmaster's death may still
    # answer the first one.
    while time.monotonic() - killed_at < 60:
        code = await asyncio.to_thread(rcpt, socket, f"nobody-{uuid.uuid4().hex[:8]}@{DOMAIN}")
        codes.append(code)
        assert code in (451, 550), codes
        if code == 550 and supervised.watch.restarts:
            break
        await asyncio.sleep(0.2)
    healed_s = time.monotonic() - killed_at
    assert supervised.watch.restarts == 1, f"not started again within 60 s: {codes}"
    assert codes[-1] == 550, f"no answer from the database 60 s after the kill: {codes}"
    assert healed_s < 20, f"took {healed_s:.1f} s: {codes}"
    assert cluster.postmaster_alive() and cluster.postmaster_pid() != lost
    # A recipient the database knows is taken again.
    assert await asyncio.to_thread(rcpt, socket, f"kim@{DOMAIN}") == 250
    assert supervised.watch.restarts == 1
    connection = await asyncpg.connect(cluster.dsn)
    try:
        row = await connection.fetchrow(
            "SELECT host, reason, detail::text AS detail FROM events WHERE kind = 'db_restart'"
            " ORDER BY id DESC LIMIT 1")
    finally:
        await connection.close()
    assert row is not None and row["host"] == "dbwatch-host"
    assert f"pid {lost}" in row["reason"] and "started again" in row["reason"], row["reason"]
