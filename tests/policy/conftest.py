"""Fixtures for the policy tests: provisioned domains, an engine, a recorder, a milter.

Domains m1.example .. m4.example with accounts bob and carol each belong to these tests
only; `policy_db` resets their limits, blocks, leases, counters and session rows before
each test.  The Postfix fixture runs containers with a bridge (mfcm0), subnet
(10.80.0.0/24), name prefix (mfcm), host row (milter-host) and socket directory of its
own, so it never touches anything of other tests running on this machine.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from mailfc.config import CONTAINER_ID_BASE, Config, parse_config
from mailfc.db import accounts, domains
from mailfc.passwords import hash_password
from mailfc.policy.engine import LimitEngine
from mailfc.policy.milter.server import MilterServer
from mailfc.policy.milter.session import FailurePolicy
from mailfc.policy.recorder import Recorder
from mailfc.runtime import cgroups
from mailfc.runtime.instance import Instance
from mailfc.runtime.lifecycle import Runtime
from mailfc.runtime.settings import from_config
from tests.conftest import delete_link, require_binary

DOMAINS = ("m1.example", "m2.example", "m3.example", "m4.example")
LOCALPARTS = ("bob", "carol")
HOST = "milter-host"
SUBNET = "10.80.0.0/24"


async def provision(pool: asyncpg.Pool) -> None:
    hashed = hash_password("milter-test-password")
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
    """Forget every limit, block, lease, counter and session row of our domains."""
    pattern = "%@m_.example"
    await pool.execute("DELETE FROM limits WHERE domain_id IN"
                       " (SELECT id FROM domains WHERE name = ANY($1))", list(DOMAINS))
    await pool.execute("DELETE FROM blocks")
    await pool.execute("DELETE FROM limit_leases WHERE subject LIKE 'domain:m_.example'"
                       " OR subject LIKE $1", "account:" + pattern)
    await pool.execute("DELETE FROM limit_counters WHERE subject LIKE 'domain:m_.example'"
                       " OR subject LIKE $1", "account:" + pattern)
    for table in ("smtp_events", "smtp_messages", "smtp_sessions"):
        if table == "smtp_events":
            await pool.execute("DELETE FROM smtp_events WHERE session_id IN"
                               " (SELECT id FROM smtp_sessions WHERE domain LIKE 'm_.example')")
        else:
            await pool.execute(f"DELETE FROM {table} WHERE domain LIKE 'm_.example'")


@pytest.fixture
async def policy_db(cmdb: asyncpg.Pool) -> asyncpg.Pool:
    await provision(cmdb)
    await reset(cmdb)
    return cmdb


async def set_limit(pool: asyncpg.Pool, target: str, kind: str, value: int, *,
                    window_s: int | None = None, mode: str = "enforce",
                    per_account: bool = False) -> None:
    from mailfc.db import limits
    async with pool.acquire() as db:
        await limits.set_limit(db, target, kind, value, window_s=window_s, mode=mode,
                               per_account=per_account)


# Shorter than the default (1 s), long enough to be seen.
REFUSAL_DELAY_S = 0.3


@dataclass
class MilterUnderTest:
    server: MilterServer
    engine: LimitEngine
    recorder: Recorder
    socket: Path


@contextlib.asynccontextmanager
async def running_milter(pool: asyncpg.Pool, socket: Path, *, lease_s: float = 60.0,
                         failure: FailurePolicy | None = None, flush_interval_s: float = 0.05,
                         refusal_delay_s: float = REFUSAL_DELAY_S
                         ) -> AsyncIterator[MilterUnderTest]:
    engine = LimitEngine(pool, lease_s=lease_s, timeout_s=2.0)
    recorder = Recorder(pool, component="milter-test", flush_interval_s=flush_interval_s,
                        holder=engine.holder)
    server = MilterServer(engine, recorder, host=HOST, socket=socket,
                          container_id_base=CONTAINER_ID_BASE,
                          failure=failure or FailurePolicy(), refusal_delay_s=refusal_delay_s)
    await engine.start()
    await recorder.start()
    await server.start()
    try:
        yield MilterUnderTest(server, engine, recorder, socket)
    finally:
        await server.stop(2.0)
        await engine.stop()
        await recorder.stop(5.0)


def socket_dir(state_dir: Path) -> Path:
    """The socket directory the Postfix containers mount, in a directory only root may
    enter (made so here, whichever of milter and runtime comes first)."""
    private = state_dir / "mfcm-private"
    private.mkdir(mode=0o700, exist_ok=True)
    return private / "sockets"


@pytest.fixture
async def milter(policy_db: asyncpg.Pool, state_dir: Path) -> AsyncIterator[MilterUnderTest]:
    """A milter in this process on the socket directory's milter.sock (Postfix's socket)."""
    async with running_milter(policy_db, socket_dir(state_dir) / "milter.sock") as m:
        yield m


async def wait_for(predicate: object, within: float = 10.0, interval: float = 0.05) -> None:
    assert callable(predicate)
    deadline = asyncio.get_running_loop().time() + within
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(interval)


def milter_config(state_dir: Path) -> Config:
    return parse_config({
        "paths": {"state_dir": str(state_dir)},
        "host": {"name": HOST},
        "network": {"bridge": "mfcm0", "subnet": SUBNET},
        "milter": {"socket": str(socket_dir(state_dir) / "milter.sock")},
        "runtime": {"start_timeout_s": 10.0},
    }, "milter tests")


@dataclass
class PostfixHost:
    config: Config
    runtime: Runtime

    async def postfix(self, domain: str) -> Instance:
        return await self.runtime.ensure(domain, "smtp")


@pytest.fixture(scope="session")
async def postfix_host(state_dir: Path, cmdb: asyncpg.Pool) -> AsyncIterator[PostfixHost]:
    """A container runtime of our own; Postfix containers started on demand, stopped at the end."""
    require_binary("runc", "runc")
    require_binary("postconf", "postfix")
    config = milter_config(state_dir)
    await provision(cmdb)
    await cmdb.execute(
        "INSERT INTO hosts (name, dispatcher_address, container_subnet)"
        " VALUES ($1, '127.0.0.1', $2) ON CONFLICT (name) DO UPDATE SET state = 'active'",
        HOST, SUBNET)
    runtime = Runtime(from_config(config, name_prefix="mfcm",
                                  socket_dir=socket_dir(state_dir)), cmdb)
    await runtime.open()
    await runtime.recover()
    try:
        yield PostfixHost(config, runtime)
    finally:
        for instance in await runtime.instances():
            await runtime.stop(instance, drain_timeout=2.0)
        await runtime.close()
        remove_host_leftovers("mfcm0", "mfcm")


def remove_host_leftovers(bridge: str, prefix: str) -> None:
    """What the runtime keeps for its next start: our bridge and the empty cgroup parent."""
    cgroups.remove_if_empty("/" + prefix)
    delete_link(bridge)
