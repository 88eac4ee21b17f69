"""Fixtures for the IMAP hook tests: a hook server, and a platform with real Dovecot.

Domains k1.example and k2.example (accounts bob, carol) belong to these tests only;
`hooks_db` resets their limits, leases, counters and session rows before each test,
and the module fixtures remove them at the end.  The platform runs the hook server,
the dispatcher (containers on bridge mfck0, subnet 10.88.0.0/24, name prefix mfck, host
row hooks-host) and the IMAP Router on ports 17xxx, with a socket directory of its own
mounted into the containers, so nothing here touches other tests running on this machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import imaplib
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from mailfc.config import Config, parse_config
from mailfc.controller.platform import Platform
from mailfc.db import accounts, domains, limits
from mailfc.passwords import hash_password
from mailfc.policy.hooks.server import HookServer, HookService
from mailfc.runtime.images import DOVECOT_MODULES
from mailfc.runtime.lifecycle import Runtime
from tests.conftest import PlatformHost, require, require_binary

DOMAINS = ("k1.example", "k2.example")
LOCALPARTS = ("bob", "carol")
PASSWORD = "hooks-test-password"
HOST = "hooks-host"
IMAP_PORT = 17143
PLUGIN = "lib95_mailfc_hooks_plugin.so"


async def provision(pool: asyncpg.Pool) -> None:
    hashed = hash_password(PASSWORD)
    async with pool.acquire() as db:
        for domain in DOMAINS:
            if not await db.fetchval("SELECT 1 FROM domains WHERE name = $1", domain):
                await domains.add(db, domain)
            for localpart in LOCALPARTS:
                if not await db.fetchval(
                        "SELECT 1 FROM accounts a JOIN domains d ON d.id = a.domain_id"
                        " WHERE a.localpart = $1 AND d.name = $2", localpart, domain):
                    await accounts.add(db, f"{localpart}@{domain}", hashed)


async def reset(pool: asyncpg.Pool) -> None:
    """Forget every limit, lease, counter and session row of our domains."""
    await pool.execute("DELETE FROM limits WHERE domain_id IN"
                       " (SELECT id FROM domains WHERE name = ANY($1))", list(DOMAINS))
    await pool.execute("DELETE FROM blocks WHERE value LIKE '%k_.example'")
    await pool.execute("DELETE FROM limit_leases WHERE subject LIKE 'domain:k_.example'"
                       " OR subject LIKE 'account:%@k_.example'")
    await pool.execute("DELETE FROM limit_counters WHERE subject LIKE 'domain:k_.example'"
                       " OR subject LIKE 'account:%@k_.example'")
    await pool.execute("DELETE FROM imap_commands WHERE domain = ANY($1)", list(DOMAINS))
    await pool.execute("DELETE FROM imap_sessions WHERE domain = ANY($1)", list(DOMAINS))


async def remove(pool: asyncpg.Pool) -> None:
    await reset(pool)
    await pool.execute("DELETE FROM domains WHERE name = ANY($1)", list(DOMAINS))


async def set_limit(pool: asyncpg.Pool, target: str, kind: str, value: int, *,
                    window_s: int | None = None, mode: str = "enforce") -> None:
    async with pool.acquire() as db:
        await limits.set_limit(db, target, kind, value, window_s=window_s, mode=mode)


@pytest.fixture
async def hooks_db(cmdb: asyncpg.Pool) -> AsyncIterator[asyncpg.Pool]:
    await provision(cmdb)
    await reset(cmdb)
    yield cmdb


def hooks_config(state_dir: Path, socket: Path, **sections: dict[str, object]) -> Config:
    data: dict[str, dict[str, object]] = {
        "paths": {"state_dir": str(state_dir)},
        "host": {"name": HOST},
        "network": {"bridge": "mfck0", "subnet": "10.88.0.0/24"},
        "listen": {"lmtp_router": "127.0.0.1:17024", "imap_router": f"127.0.0.1:{IMAP_PORT}",
                   "imap_router_tls": "127.0.0.1:17993"},
        "dispatcher": {"address": "127.0.0.1", "lmtp_port": 17224, "imap_port": 17243,
                       "smtp_port": 17587, "allowed_clients": ["127.0.0.0/8"]},
        "imap_router": {"allow_plaintext_auth": True, "auth_failure_delay_s": 0.1},
        "runtime": {"name_prefix": "mfck", "start_timeout_s": 10.0},
        # Generous: other engineers' tests share these two cores.
        "hooks": {"socket": str(socket), "timeout_ms": 3000, "limits_poll_s": 0.3},
        "recorder": {"flush_interval_s": 0.05},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return parse_config(data, "hook tests")


@dataclass
class HooksHost(PlatformHost):
    socket: Path

    @property
    def runtime(self) -> Runtime:
        assert self.platform.runtime is not None
        return self.platform.runtime

    @property
    def hooks(self) -> HookService:
        service = next(s for s in self.platform.services if s.name == "hook-server")
        assert isinstance(service, HookService)
        return service

    def dovecot_log(self, domain: str) -> str:
        paths = glob.glob(str(self.runtime.settings.domains_dir / domain / "dovecot-*.log"))
        return "".join(Path(p).read_text(errors="replace") for p in sorted(paths))

    async def wait_recorded(self, sql: str, *args: object, expect: object = None,
                            within_s: float = 10.0) -> object:
        """Poll until `sql` returns `expect` (or any true value when expect is None):
        records are written in batches, a moment after the fact."""
        deadline = asyncio.get_running_loop().time() + within_s
        while True:
            value = await self.pool.fetchval(sql, *args)
            done = value == expect if expect is not None else bool(value)
            if done or asyncio.get_running_loop().time() > deadline:
                return value
            await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
async def hooks_host(state_dir: Path, cmdb: asyncpg.Pool) -> AsyncIterator[HooksHost]:
    require_binary("runc", "runc")
    require_binary("dovecot", "dovecot-imapd")
    require((DOVECOT_MODULES / PLUGIN).exists(),
            f"the hook plugin in {DOVECOT_MODULES} (make -C plugins/dovecot_hooks install)")
    # Placement must choose this test's host for the test domains.
    await provision(cmdb)
    await cmdb.execute("UPDATE domains SET host_id = NULL WHERE name = ANY($1)", list(DOMAINS))
    # The socket directory sits in a directory only root may enter (as the runtime
    # requires); Platform.start() makes it.
    sockets = state_dir / "hooks-test-private" / "sockets"
    sockets.parent.mkdir(mode=0o700, exist_ok=True)
    config = hooks_config(state_dir, sockets / "hooks.sock")
    platform = Platform(config, ("hook-server", "dispatcher", "imap-router"),
                        runtime_overrides={"socket_dir": sockets})
    await cmdb.execute("UPDATE hosts SET state = 'draining' WHERE name <> $1", HOST)
    try:
        await platform.start()
    finally:
        await cmdb.execute("UPDATE hosts SET state = 'active' WHERE name <> $1", HOST)
    await cmdb.execute(
        "UPDATE domains SET host_id = (SELECT id FROM hosts WHERE name = $1)"
        " WHERE name = ANY($2)", HOST, list(DOMAINS))
    try:
        yield HooksHost(platform, sockets / "hooks.sock")
    finally:
        await platform.stop()
        await asyncio.to_thread(subprocess.run, ["ip", "link", "del", "mfck0"],
                                capture_output=True, check=False)
        await remove(cmdb)
        await cmdb.execute("DELETE FROM hosts WHERE name = $1", HOST)


def imap_login(address: str = "bob@k1.example") -> imaplib.IMAP4:
    client = imaplib.IMAP4("127.0.0.1", IMAP_PORT, timeout=30)
    try:
        client.login(address, PASSWORD)
    except BaseException:
        with contextlib.suppress(OSError):
            client.shutdown()
        raise
    return client


def imap_close(client: imaplib.IMAP4) -> None:
    with contextlib.suppress(Exception):
        client.logout()
    with contextlib.suppress(OSError):
        client.shutdown()


@pytest.fixture
async def hook_server(tmp_path_factory: pytest.TempPathFactory, hooks_db: asyncpg.Pool
                      ) -> AsyncIterator[HookServer]:
    """A hook server alone on a socket of its own (engine and recorder started)."""
    from mailfc.policy.engine import LimitEngine
    from mailfc.policy.hooks.session import HookPolicy
    from mailfc.policy.recorder import Recorder

    engine = LimitEngine(hooks_db, lease_s=30)
    recorder = Recorder(hooks_db, component="hook-test", flush_interval_s=0.05)
    socket = tmp_path_factory.mktemp("hooks") / "hooks.sock"
    server = HookServer(engine, recorder, hooks_db, host="unit-host", socket=socket,
                        socket_gid=None, policy=HookPolicy(700, "open", "accept"),
                        limits_poll_s=0.2)
    await engine.start()
    await recorder.start()
    await server.start()
    try:
        yield server
    finally:
        await server.stop(2.0)
        await engine.stop()
        await recorder.stop(2.0)
