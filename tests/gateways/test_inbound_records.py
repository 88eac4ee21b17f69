"""Inbound limits and records per account: received_messages of an account and the
per-account default are enforced at RCPT (not only the domain's), and a refusal at
RCPT records the recipient's domain (sessions list --domain, abuse top --by domain)."""

from __future__ import annotations

import asyncio
import smtplib

import asyncpg

from mailfc.db import limits
from tests.gateways.conftest import SMTP_PORT, Gateways, wait_for


def rcpts(*recipients: str) -> list[tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", SMTP_PORT, timeout=30) as client:
        client.ehlo("records.example")
        client.mail("ann@remote.example")
        answers = [client.rcpt(address) for address in recipients]
        client.rset()
        return answers


async def _clear(pool: asyncpg.Pool) -> None:
    await pool.execute("DELETE FROM limits WHERE kind = 'received_messages' AND domain_id IN"
                       " (SELECT id FROM domains WHERE name = 'g1.example')")


async def test_received_messages_per_account_and_per_account_default(
        gateways: Gateways, cmdb: asyncpg.Pool) -> None:
    await _clear(cmdb)
    try:
        async with cmdb.acquire() as db:
            await limits.set_limit(db, "bob@g1.example", "received_messages", 0,
                                   window_s=3600)
        # SMTP-In reads which domains have such limits every few seconds.
        await wait_for(lambda: rcpts("bob@g1.example")[0][0] == 451, within=15)
        bob, carol = await asyncio.to_thread(rcpts, "bob@g1.example", "carol@g1.example")
        assert bob[0] == 451 and b"received messages" in bob[1]
        assert carol[0] == 250                    # the account's limit, not the domain's
        async with cmdb.acquire() as db:
            await limits.set_limit(db, "g1.example", "received_messages", 0, window_s=3600,
                                   per_account=True)
        await wait_for(lambda: rcpts("carol@g1.example")[0][0] == 451, within=15)
        dave = await asyncio.to_thread(rcpts, "dave@g2.example")
        assert dave[0][0] == 250                  # another domain: untouched
        rule = await cmdb.fetchval(
            "SELECT e.rule FROM smtp_events e JOIN smtp_sessions s ON s.id = e.session_id"
            " WHERE s.helo = 'records.example' AND e.stage = 'rcpt'"
            " ORDER BY e.at DESC LIMIT 1")
        assert rule == "limit:received_messages/1h@account_default"
    finally:
        await _clear(cmdb)


async def test_a_refusal_at_rcpt_names_the_recipient_domain(
        gateways: Gateways, cmdb: asyncpg.Pool) -> None:
    unknown, relay = await asyncio.to_thread(rcpts, "nobody@g2.example",
                                             "someone@elsewhere.example")
    assert unknown[0] == 550 and relay[0] == 554

    for _ in range(150):        # the records are written within a flush interval or two
        if await cmdb.fetchval(
                "SELECT count(*) FROM smtp_sessions s JOIN smtp_events e ON e.session_id = s.id"
                " WHERE s.helo = 'records.example' AND s.domain = 'g2.example'"
                " AND e.rule = 'smtp:unknown_user'"):
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the refusal was not recorded with its domain")
    assert not await cmdb.fetchval(
        "SELECT count(*) FROM smtp_sessions WHERE domain = 'elsewhere.example'")
    assert await cmdb.fetchval(
        "SELECT count(*) FROM smtp_messages WHERE domain = 'g2.example'"
        " AND verdict IS DISTINCT FROM 'accept' AND sender = 'ann@remote.example'") >= 1
