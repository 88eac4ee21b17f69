"""Fixtures for the gateway tests: SMTP-In as a real process, LMTP Router, Dovecot.

Everything of these tests is their own: bridge mfcg0, subnet 10.89.0.0/24, container
prefix mfcg, host row gateway-host, ports 18xxx, spool <state_dir>/mfcg-spool, domains
g1.example, g2.example and gbroken.example (whose Dovecot can never start).  SMTP-In
runs as `mailfc up --services smtp-in` in a process of its own (so a test can kill -9
it); the dispatcher and LMTP Router run in the test process.  SMTP-In runs the
[filter_in] chain at end of data with two milters: OpenDKIM (Debian package), which
signs, and tests.gateways.milter.TestMilter (in the test process), which refuses or
changes what a test's Subject asks for.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from mailfc.config import Config, parse_config
from mailfc.controller.platform import Platform
from mailfc.db import accounts, domains
from mailfc.passwords import hash_password
from mailfc.routers.lmtp import LmtpRouter
from tests.conftest import require_binary
from tests.dkim import opendkim_signing
from tests.gateways.milter import TestMilter

HOST = "gateway-host"
SMTP_PORT = 18025
# The internal hop's socket (mailfc.hops), a name of its own in the session's state
# directory; the former loopback ports of Filter-In and the router, where nothing may
# answer now.
LMTP_ROUTER = "unix:mfcg-lmtp-router.sock"
FORMER_HOP_PORTS = (18026, 18024)
DKIM_PORT = 18891
MILTER_PORT = 18892
DOMAINS = ("g1.example", "g2.example", "gbroken.example")
ACCOUNTS = ("bob@g1.example", "carol@g1.example", "dave@g2.example", "erin@gbroken.example")


def gateway_data(state_dir: Path, **sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    data: dict[str, dict[str, Any]] = {
        "paths": {"state_dir": str(state_dir)},
        "host": {"name": HOST},
        "network": {"bridge": "mfcg0", "subnet": "10.89.0.0/24"},
        "runtime": {"name_prefix": "mfcg", "start_timeout_s": 5.0},
        "listen": {"smtp_in": f"127.0.0.1:{SMTP_PORT}", "lmtp_router": LMTP_ROUTER,
                   "imap_router": "127.0.0.1:18143", "imap_router_tls": "127.0.0.1:18993",
                   "submission": "127.0.0.1:18587", "submissions": "127.0.0.1:18465",
                   "milter": "127.0.0.1:18030", "hook_server": "127.0.0.1:18031"},
        "dispatcher": {"address": "127.0.0.1", "lmtp_port": 18124, "imap_port": 18243,
                       "smtp_port": 18687, "allowed_clients": ["127.0.0.0/8", "10.0.0.0/8"]},
        "spool": {"directory": str(state_dir / "mfcg-spool"), "retry_base_s": 0.5,
                  "retry_max_s": 2.0, "scan_interval_s": 0.2, "min_free_bytes": 1 << 20},
        "filter_in": {"milters": [f"inet:127.0.0.1:{DKIM_PORT}",
                                  f"inet:127.0.0.1:{MILTER_PORT}"], "milter_timeout_s": 10.0,
                      "quarantine_dir": str(state_dir / "mfcg-quarantine")},
        "recorder": {"flush_interval_s": 0.05},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return data


def write_toml(path: Path, data: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            rendered = (repr(value).replace("'", '"') if not isinstance(value, bool)
                        else str(value).lower())
            lines.append(f"{key} = {rendered}")
    path.write_text("\n".join(lines) + "\n")
    return path


async def provision(pool: asyncpg.Pool) -> None:
    hashed = hash_password("gateway-test-password")
    async with pool.acquire() as db:
        for domain in DOMAINS:
            if not await db.fetchval("SELECT 1 FROM domains WHERE name = $1", domain):
                await domains.add(db, domain)
        for address in ACCOUNTS:
            if not await db.fetchval(
                    "SELECT 1 FROM accounts a JOIN domains d ON d.id = a.domain_id"
                    " WHERE a.localpart || '@' || d.name = $1", address):
                await accounts.add(db, address, hashed)
        await db.execute(
            "INSERT INTO container_specs (domain_id, service, memory_bytes)"
            " SELECT id, 'imap', 1048576 FROM domains WHERE name = 'gbroken.example'"
            " ON CONFLICT DO NOTHING")


def wait_port(port: int, timeout: float, process: subprocess.Popen[bytes] | None = None
              ) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None:
            assert process.poll() is None, "the process exited early"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port} after {timeout}s")


@dataclass
class Gateways:
    platform: Platform
    config_file: Path
    state_dir: Path
    smtp_in: subprocess.Popen[bytes] | None = None
    logs: list[Path] = field(default_factory=list)

    @property
    def config(self) -> Config:
        return self.platform.config

    @property
    def router(self) -> LmtpRouter:
        """The spool's next hop."""
        return next(s for s in self.platform.services if isinstance(s, LmtpRouter))

    @property
    def spool_dir(self) -> Path:
        return Path(self.config.spool.directory) / "smtp-in"

    def start_smtp_in(self) -> None:
        log = self.state_dir / f"mfcg-smtp-in-{len(self.logs)}.log"
        self.logs.append(log)
        with log.open("wb") as handle:
            self.smtp_in = subprocess.Popen(
                [sys.executable, "-m", "mailfc", "--config", str(self.config_file), "up",
                 "--services", "smtp-in"], stdout=handle, stderr=subprocess.STDOUT,
                env={**os.environ})
        wait_port(SMTP_PORT, 60, self.smtp_in)

    def kill_smtp_in(self, sig: int = signal.SIGKILL) -> None:
        assert self.smtp_in is not None
        self.smtp_in.send_signal(sig)
        self.smtp_in.wait(timeout=60)
        self.smtp_in = None

    def queued(self) -> list[str]:
        queue = self.spool_dir / "queue"
        return sorted(p.name for p in queue.iterdir() if "." not in p.name) \
            if queue.exists() else []


def delivered(mail_root: Path, address: str, marker: str) -> list[bytes]:
    localpart, domain = address.split("@")
    found = []
    for sub in ("new", "cur"):
        folder = mail_root / domain / localpart / "Maildir" / sub
        if folder.exists():
            for path in folder.iterdir():
                data = path.read_bytes()
                if marker.encode() in data:
                    found.append(data)
    return found


async def wait_for(predicate: Any, within: float = 30.0, interval: float = 0.1) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await asyncio.to_thread(predicate):
            return
        await asyncio.sleep(interval)
    raise AssertionError(f"condition not met within {within}s")


@pytest.fixture(scope="session")
def opendkim(state_dir: Path) -> Iterator[Path]:
    with opendkim_signing(state_dir / "mfcg-dkim", "remote.example", DKIM_PORT) as directory:
        yield directory


@pytest.fixture(scope="session")
async def test_milter() -> AsyncIterator[TestMilter]:
    milter = TestMilter(MILTER_PORT)
    await milter.start()
    try:
        yield milter
    finally:
        await milter.stop()


@pytest.fixture(scope="session")
async def gateways(state_dir: Path, cmdb: asyncpg.Pool, opendkim: Path,
                   test_milter: TestMilter) -> AsyncIterator[Gateways]:
    require_binary("runc", "runc")
    require_binary("dovecot", "dovecot-lmtpd")
    await provision(cmdb)
    data = gateway_data(state_dir)
    config_file = write_toml(state_dir / "mfcg.toml", data)
    platform = Platform(parse_config(data, "gateway tests"),
                        ("dispatcher", "lmtp-router"))
    await platform.start()
    await cmdb.execute("UPDATE domains SET host_id = (SELECT id FROM hosts WHERE name = $1)"
                       " WHERE name = ANY($2)", HOST, list(DOMAINS))
    gateways = Gateways(platform, config_file, state_dir)
    try:
        await asyncio.to_thread(gateways.start_smtp_in)
        yield gateways
    finally:
        if gateways.smtp_in is not None:
            await asyncio.to_thread(gateways.kill_smtp_in, signal.SIGTERM)
        await platform.stop()
        await asyncio.to_thread(subprocess.run, ["ip", "link", "del", "mfcg0"],
                                capture_output=True, check=False)
        await cmdb.execute("UPDATE domains SET host_id = NULL WHERE name = ANY($1)",
                           list(DOMAINS))
