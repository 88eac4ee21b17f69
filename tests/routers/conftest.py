"""A running host for router tests: the platform's dispatcher, LMTP and IMAP routers.

Everything listens on loopback on ports of its own, and the containers use a
bridge, subnet and name prefix of their own, so these tests never touch
anything of a running platform or of the runtime tests.  The fixture is
session-scoped and runs after the CLI tests (which truncate the CMDB).
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from mailfc.config import Config, parse_config
from mailfc.controller.platform import Platform
from mailfc.db import accounts, domains
from mailfc.passwords import hash_password
from mailfc.runtime.lifecycle import Runtime
from tests.conftest import PlatformHost, require_binary

HOST = "router-host"
PASSWORD = "router-test-password"
# The LMTP Router's socket in the hops' directory (mailfc.hops), a name of its own
# in the test session's state directory.
LMTP_ROUTER = "unix:router-tests-lmtp.sock"
IMAP_PORT = 11143
IMAPS_PORT = 11993
SUBMISSION_PORT = 11587
SUBMISSIONS_PORT = 11465
DISPATCHER_IMAP_PORT = 12143


def router_config(state_dir: Path, **sections: dict[str, object]) -> Config:
    data: dict[str, dict[str, object]] = {
        "paths": {"state_dir": str(state_dir)},
        "host": {"name": HOST},
        "network": {"bridge": "mfcr0", "subnet": "10.87.0.0/24"},
        "listen": {"lmtp_router": LMTP_ROUTER,
                   "imap_router": f"127.0.0.1:{IMAP_PORT}",
                   "imap_router_tls": f"127.0.0.1:{IMAPS_PORT}",
                   "submission": f"127.0.0.1:{SUBMISSION_PORT}",
                   "submissions": f"127.0.0.1:{SUBMISSIONS_PORT}"},
        "dispatcher": {"address": "127.0.0.1", "lmtp_port": 12024,
                       "imap_port": DISPATCHER_IMAP_PORT, "smtp_port": 12587,
                       "allowed_clients": ["127.0.0.0/8", "10.0.0.0/8"]},
        "imap_router": {"auth_failure_delay_s": 0.1, "max_failures_per_ip": 50},
        "submission": {"auth_failure_delay_s": 0.1, "max_failures_per_ip": 50},
        "runtime": {"start_timeout_s": 5.0},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return parse_config(data, "router tests")


def lmtp_socket(config: Config) -> Path:
    return config.hops_dir / LMTP_ROUTER.removeprefix("unix:")


class RouterHost(PlatformHost):
    @property
    def runtime(self) -> Runtime:
        assert self.platform.runtime is not None
        return self.platform.runtime

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
        # broken.example's servers can never start: 1 MiB of memory is too little.
        await db.execute(
            "INSERT INTO container_specs (domain_id, service, memory_bytes)"
            " SELECT id, service, 1048576 FROM domains, (VALUES ('imap'), ('smtp')) v(service)"
            " WHERE name = 'broken.example' ON CONFLICT DO NOTHING")


@pytest.fixture(scope="session")
async def router_host(state_dir: Path, cmdb: asyncpg.Pool) -> AsyncIterator[RouterHost]:
    require_binary("runc", "runc")
    require_binary("dovecot", "dovecot-imapd")
    # Placement must choose this test's host for the test domains.
    await cmdb.execute("UPDATE hosts SET state = 'draining' WHERE name <> $1", HOST)
    await provision(cmdb)
    # No controller: these tests start and stop containers themselves.
    platform = Platform(router_config(state_dir, runtime={"name_prefix": "mfcr"}),
                        ("milter", "dispatcher", "lmtp-router", "imap-router",
                         "submission-router"))
    await platform.start()
    try:
        yield RouterHost(platform)
    finally:
        await platform.stop()
        # The bridge outlives the runtime on purpose (the next start reuses it);
        # this test's bridge goes with the test.
        await asyncio.to_thread(subprocess.run,
                                ["ip", "link", "del", platform.config.network.bridge],
                                capture_output=True, check=False)
        await cmdb.execute("UPDATE hosts SET state = 'active' WHERE name <> $1", HOST)
        await cmdb.execute("UPDATE domains SET host_id = NULL")
