"""Milter processes of their own: two share one limit; kill -9 gives slots back after the lease."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg

from tests.policy.conftest import HOST, PostfixHost, set_limit, socket_dir, wait_for
from tests.policy.mta import MtaClient, reply_text
from tests.policy.smtp_client import finish, open_session, transaction

LEASE_S = 2.0


def write_config(state_dir: Path) -> Path:
    path = state_dir / "mfcm-milter.toml"
    path.write_text(f'[paths]\nstate_dir = "{state_dir}"\n[host]\nname = "{HOST}"\n'
                    f"[policy]\nlease_s = {LEASE_S}\n[recorder]\nflush_interval_s = 0.05\n")
    return path


@contextlib.asynccontextmanager
async def milter_process(state_dir: Path, socket: Path
                         ) -> AsyncIterator[asyncio.subprocess.Process]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mailfc.policy.milter", "--config", str(write_config(state_dir)),
        "--socket", str(socket), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        assert line == b"ready\n", line
        yield process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), 15)
            except TimeoutError:
                process.kill()
                await process.wait()


async def leases_are(pool: asyncpg.Pool, account: str, count: int) -> bool:
    return await leases(pool, account) == count


async def leases(pool: asyncpg.Pool, account: str) -> int:
    """Live leases (an expired one is only deleted by the next acquire of its subject)."""
    return int(await pool.fetchval(
        "SELECT count(*) FROM limit_leases WHERE subject = $1 AND expires_at > now()",
        f"account:{account}"))


async def test_two_processes_share_a_limit_and_kill_9_returns_slots(
        postfix_host: PostfixHost, policy_db: asyncpg.Pool, state_dir: Path) -> None:
    account = "carol@m4.example"
    await set_limit(policy_db, account, "concurrent_sends", 3)
    postfix = await postfix_host.postfix("m4.example")
    sockets = socket_dir(state_dir)
    other_socket = state_dir / "mfcm-other" / "milter.sock"
    async with milter_process(state_dir, sockets / "milter.sock") as first, \
            milter_process(state_dir, other_socket):
        # Two transactions held open through Postfix -> process 1.
        sessions = [await asyncio.to_thread(open_session, postfix.socket(), account)
                    for _ in range(2)]
        clients: list[MtaClient] = []
        try:
            for smtp in sessions:
                assert (await asyncio.to_thread(smtp.mail, account))[0] == 250
            assert await leases(policy_db, account) == 2
            # Process 2 (driven directly over the milter protocol) gets the third slot only.
            clients = [await MtaClient.open(other_socket, "m4.example") for _ in range(3)]
            replies = [reply_text(await c.mail(account, account)) for c in clients]
            assert replies[:2] == ["c", "451 4.7.1 account carol@m4.example has 3 messages in"
                                   " transit (limit 3 at once); try again when one has finished"]
            # And process 1 now refuses a third Postfix transaction too.
            third = await asyncio.to_thread(open_session, postfix.socket(), account)
            refused = await asyncio.to_thread(transaction, third, account, ["ann@m4.example"])
            assert refused.mail[0] == 451
            await asyncio.to_thread(finish, third)

            # kill -9 process 1 while it holds two slots: they stay taken until the lease ends.
            first.kill()
            await first.wait()
            killed_at = time.monotonic()
            assert await leases(policy_db, account) == 3
            assert reply_text(await clients[2].mail(account, account)).startswith("451 4.7.1")
            clients[2].abort()
            while time.monotonic() - killed_at < LEASE_S + 3:
                if reply_text(await clients[2].mail(account, account)) == "c":
                    break
                clients[2].abort()
                await asyncio.sleep(0.1)
            returned_after = time.monotonic() - killed_at
            assert returned_after <= LEASE_S + 1.0, returned_after
            # Both dead leases expire (the second a moment after the first); the slot we
            # hold through process 2 stayed ours throughout (it is renewed).
            await wait_for(lambda: leases_are(policy_db, account, 2), within=2.0)
        finally:
            for client in clients:
                await client.quit()
            for smtp in sessions:
                await asyncio.to_thread(finish, smtp)
    assert await leases(policy_db, account) == 0
