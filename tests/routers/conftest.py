"""A running host for router tests: runtime, dispatcher, LMTP and IMAP routers.

Everything listens on loopback on ports of its own, and the containers use a
bridge, subnet and name prefix of their own, so these tests never touch
anything of a running platform or of the runtime tests.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from mailfc.config import Config, parse_config
from mailfc.db import accounts, domains
from mailfc.dispatcher.server import Dispatcher
from mailfc.passwords import hash_password
from mailfc.routers.directory import Directory
from mailfc.routers.imap import ImapRouter
from mailfc.routers.lmtp import LmtpRouter
from mailfc.runtime.lifecycle import Runtime
from mailfc.runtime.settings import from_config
from mailfc.tls import server_context
from tests.conftest import require_binary

HOST = "router-host"
PASSWORD = "router-test-password"
LMTP_PORT = 11024
IMAP_PORT = 11143
IMAPS_PORT = 11993


def router_config(state_dir: Path, *, host: str = HOST, subnet: str = "10.79.0.0/24",
                  bridge: str = "mfcr0", dispatcher_address: str = "127.0.0.1",
                  lmtp_port: int = LMTP_PORT, imap_port: int = IMAP_PORT,
                  imaps_port: int = IMAPS_PORT) -> Config:
    return parse_config({
        "paths": {"state_dir": str(state_dir)},
        "host": {"name": host},
        "network": {"bridge": bridge, "subnet": subnet},
        "listen": {"lmtp_router": f"127.0.0.1:{lmtp_port}",
                   "imap_router": f"127.0.0.1:{imap_port}",
                   "imap_router_tls": f"127.0.0.1:{imaps_port}"},
        "dispatcher": {"address": dispatcher_address, "lmtp_port": 12024,
                       "imap_port": 12143, "smtp_port": 12587,
                       "allowed_clients": ["127.0.0.0/8", "10.0.0.0/8"]},
        "imap_router": {"auth_failure_delay_s": 0.1, "max_failures_per_ip": 50},
        "runtime": {"start_timeout_s": 5.0},
    }, "router tests")


@dataclass
class RouterHost:
    config: Config
    pool: asyncpg.Pool
    runtime: Runtime
    dispatcher: Dispatcher
    imap: ImapRouter
    lmtp: LmtpRouter

    @property
    def mail_root(self) -> Path:
        return self.config.mail_root

    async def stop_containers(self, domain: str | None = None) -> None:
        for instance in await self.runtime.instances(domain):
            await self.runtime.stop(instance, drain_timeout=2.0)


def client_tls() -> ssl.SSLContext:
    # The router's certificate is self-signed; the test accepts it explicitly.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def provision(pool: asyncpg.Pool) -> None:
    hashed = hash_password(PASSWORD)
    async with pool.acquire() as db:
        for domain in ("a.example", "b.example", "broken.example"):
            if not await db.fetchval("SELECT 1 FROM domains WHERE name = $1", domain):
                await domains.add(db, domain)
        for address in ("bob@a.example", "carol@a.example", "dave@b.example",
                        "erin@broken.example"):
            if not await db.fetchval(
                    "SELECT 1 FROM accounts a JOIN domains d ON d.id = a.domain_id"
                    " WHERE a.localpart || '@' || d.name = $1", address):
                await accounts.add(db, address, hashed)
        if not await db.fetchval("SELECT 1 FROM aliases"):
            await accounts.add_alias(db, "info@a.example", "bob@a.example")
            await accounts.add_alias(db, "info@a.example", "dave@b.example")
        # broken.example's Dovecot can never start: one process is not enough.
        await db.execute(
            "INSERT INTO container_specs (domain_id, service, pids_limit)"
            " SELECT id, 'imap', 1 FROM domains WHERE name = 'broken.example'"
            " ON CONFLICT DO NOTHING")


@pytest.fixture(scope="session")
async def router_host(state_dir: Path, cmdb: asyncpg.Pool) -> AsyncIterator[RouterHost]:
    require_binary("runc", "runc")
    require_binary("dovecot", "dovecot-imapd")
    config = router_config(state_dir)
    await cmdb.execute(
        "INSERT INTO hosts (name, dispatcher_address, container_subnet, imap_port, lmtp_port,"
        " smtp_port) VALUES ($1, '127.0.0.1', $2, 12143, 12024, 12587)"
        " ON CONFLICT (name) DO UPDATE SET state = 'active'", HOST, config.network.subnet)
    # Placement must choose this host for the test domains.
    await cmdb.execute("UPDATE hosts SET state = 'draining' WHERE name <> $1", HOST)
    await provision(cmdb)
    runtime = Runtime(from_config(config, name_prefix="mfcr"), cmdb)
    await runtime.open()
    await runtime.recover()
    directory = Directory(cmdb)
    host = RouterHost(config, cmdb, runtime, Dispatcher(config, runtime, cmdb),
                      ImapRouter(config, directory, server_context(config)),
                      LmtpRouter(config, directory))
    for service in (host.dispatcher, host.lmtp, host.imap):
        await service.start()
    try:
        yield host
    finally:
        for service in (host.imap, host.lmtp, host.dispatcher):
            await service.stop(2.0)
        await host.stop_containers()
        await runtime.close()
        await cmdb.execute("UPDATE hosts SET state = 'active' WHERE name <> $1", HOST)
        await cmdb.execute("UPDATE domains SET host_id = NULL")
