"""The milter behind a real per-domain Postfix container, driven by swaks and smtplib."""

from __future__ import annotations

import asyncio
import datetime

import asyncpg

from tests.policy.conftest import (
    REFUSAL_DELAY_S,
    MilterUnderTest,
    PostfixHost,
    set_limit,
    wait_for,
)
from tests.policy.smtp_client import (
    Attempt,
    finish,
    open_session,
    send_one,
    swaks,
    transaction,
)


async def flushed(milter: MilterUnderTest) -> None:
    await wait_for(lambda: milter.recorder.stats().pending == 0)
    await milter.recorder.flush()


def max_overlap(intervals: list[tuple[datetime.datetime, datetime.datetime]]) -> int:
    """The largest number of intervals open at one instant."""
    points = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals],
                    key=lambda p: (p[0], p[1]))   # an end before a start at the same instant
    current = peak = 0
    for _, step in points:
        current += step
        peak = max(peak, current)
    return peak


async def test_every_stage_is_recorded(postfix_host: PostfixHost, milter: MilterUnderTest,
                                       policy_db: asyncpg.Pool) -> None:
    postfix = await postfix_host.postfix("m1.example")
    out = await asyncio.to_thread(
        swaks, postfix.socket(), "--ehlo", "client.example",
        "--xclient-login", "bob@m1.example", "--xclient-addr", "192.0.2.9",
        "--xclient-name", "nine.client.example",
        "--from", "bob@m1.example", "--to", "ann@m1.example,joe@m1.example",
        "--add-header", "Message-ID: <swaks-stages@m1.example>",
        "--header", "Subject: stages", "--body", "stage test body")
    assert "250 2.0.0 Ok: queued as" in out, out
    queue_id = out.split("queued as ")[1].split()[0]
    await flushed(milter)
    row = await policy_db.fetchrow(
        "SELECT s.*, s.recipients AS s_recipients, m.queue_id, m.sender, m.recipients AS rcpts,"
        " m.recipient_count, m.message_id,"
        " m.subject_digest, m.size, m.verdict AS m_verdict, m.started_at AS m_started,"
        " m.ended_at AS m_ended, m.account AS m_account"
        " FROM smtp_messages m JOIN smtp_sessions s ON s.id = m.session_id"
        " WHERE m.domain = 'm1.example'")
    assert row is not None
    assert row["component"] == "postfix" and row["domain"] == "m1.example"
    assert str(row["client_ip"]) == "192.0.2.9" and row["client_name"] == "nine.client.example"
    assert row["helo"] == "client.example"
    assert row["account"] == row["m_account"] == "bob@m1.example"
    assert row["sender"] == "bob@m1.example"
    assert row["rcpts"] == ["ann@m1.example", "joe@m1.example"]
    assert row["recipient_count"] == 2 and row["queue_id"] == queue_id
    assert row["message_id"] == "<swaks-stages@m1.example>"
    assert row["subject_digest"] and row["size"] > len("stage test body")
    assert row["m_verdict"] == "accept" and row["m_ended"] >= row["m_started"]
    assert row["ended_at"] is not None and row["messages"] == 1 and row["s_recipients"] == 2


async def test_twenty_parallel_senders_against_three_slots(
        postfix_host: PostfixHost, milter: MilterUnderTest, policy_db: asyncpg.Pool) -> None:
    await set_limit(policy_db, "bob@m2.example", "concurrent_sends", 3)
    postfix = await postfix_host.postfix("m2.example")
    path = postfix.socket()
    attempts: list[Attempt] = await asyncio.gather(*(
        asyncio.to_thread(send_one, path, "bob@m2.example", ["ann@m2.example"], hold_s=0.6)
        for _ in range(20)))
    accepted = [a for a in attempts if a.accepted]
    refused = [a for a in attempts if a.mail[0] != 250]
    assert len(accepted) + len(refused) == 20
    assert 3 <= len(accepted) < 20
    for attempt in refused:
        assert attempt.mail[0] == 451 and attempt.mail[1].startswith("4.7.1"), attempt.mail
        assert "bob@m2.example has 3 messages in transit (limit 3 at once)" in attempt.mail[1]
        # SLOW REFUSALS: a sender over its limit hears it only after the delay.
        assert attempt.ended - attempt.started >= REFUSAL_DELAY_S * 0.9
    await flushed(milter)
    rows = await policy_db.fetch(
        "SELECT started_at, ended_at, verdict FROM smtp_messages"
        " WHERE account = 'bob@m2.example'")
    assert sorted(r["verdict"] for r in rows) == sorted(
        ["accept"] * len(accepted) + ["tempfail"] * len(refused))
    intervals = [(r["started_at"], r["ended_at"]) for r in rows if r["verdict"] == "accept"]
    # The proof from the records: never more than 3 transactions open at once, and the
    # limit was really reached (the senders overlapped).
    assert max_overlap(intervals) == 3
    assert await policy_db.fetchval("SELECT count(*) FROM smtp_events WHERE rule ="
                                    " 'limit:concurrent_sends@account'") == len(refused)
    assert await policy_db.fetchval(
        "SELECT count(*) FROM limit_leases WHERE subject = 'account:bob@m2.example'") == 0


async def test_rate_limit_refuses_the_eleventh(postfix_host: PostfixHost,
                                              milter: MilterUnderTest,
                                              policy_db: asyncpg.Pool) -> None:
    await set_limit(policy_db, "m2.example", "messages", 10, window_s=60, per_account=True)
    postfix = await postfix_host.postfix("m2.example")

    def eleven() -> list[Attempt]:
        smtp = open_session(postfix.socket(), "carol@m2.example")
        try:
            return [transaction(smtp, "carol@m2.example", ["ann@m2.example"])
                    for _ in range(11)]
        finally:
            finish(smtp)
    attempts = await asyncio.to_thread(eleven)
    assert all(a.accepted for a in attempts[:10])
    code, text = attempts[10].mail
    assert code == 451 and text.startswith("4.7.1 account carol@m2.example reached its limit"
                                           " of 10 messages per 1m (10 used); try again in")
    # Another account of the same domain has its own default allowance.
    assert (await asyncio.to_thread(send_one, postfix.socket(), "bob@m2.example",
                                    ["ann@m2.example"])).accepted
    await flushed(milter)
    event = await policy_db.fetchrow("SELECT * FROM smtp_events WHERE stage = 'mail'"
                                     " AND rule = 'limit:messages/1m@account_default'")
    assert event["verdict"] == "tempfail" and event["mode"] == "enforce"
    assert "try again in" in event["reason"]


async def test_shadow_mode_passes_and_records(postfix_host: PostfixHost,
                                             milter: MilterUnderTest,
                                             policy_db: asyncpg.Pool) -> None:
    await set_limit(policy_db, "bob@m3.example", "messages", 2, window_s=60, mode="shadow")
    await set_limit(policy_db, "bob@m3.example", "recipients_per_message", 1, mode="shadow")
    postfix = await postfix_host.postfix("m3.example")
    attempts = [await asyncio.to_thread(send_one, postfix.socket(), "bob@m3.example",
                                        ["ann@m3.example", "joe@m3.example"])
                for _ in range(4)]
    assert all(a.accepted for a in attempts)
    await flushed(milter)
    events = await policy_db.fetch(
        "SELECT e.stage, e.rule, e.mode, e.verdict FROM smtp_events e JOIN smtp_sessions s"
        " ON s.id = e.session_id WHERE s.domain = 'm3.example' ORDER BY e.id")
    rules = [(e["stage"], e["rule"]) for e in events]
    assert all(e["mode"] == "shadow" and e["verdict"] == "tempfail" for e in events)
    # Each message had one recipient too many; messages 3 and 4 were over the window
    # at MAIL (2 counted).  A shadow refusal is recorded once per transaction: not
    # again at end of message, where the same rule refuses the same message.
    assert rules.count(("rcpt", "limit:recipients_per_message@account")) == 4
    assert rules.count(("mail", "limit:messages/1m@account")) == 2
    assert rules.count(("eom", "limit:messages/1m@account")) == 0
    assert await policy_db.fetchval(
        "SELECT count(*) FROM smtp_messages WHERE domain = 'm3.example'"
        " AND verdict = 'accept' AND recipient_count = 2") == 4


async def test_a_limit_changed_while_postfix_runs_applies_at_once(
        postfix_host: PostfixHost, milter: MilterUnderTest, policy_db: asyncpg.Pool) -> None:
    postfix = await postfix_host.postfix("m3.example")
    path = postfix.socket()
    await set_limit(policy_db, "carol@m3.example", "messages", 0, window_s=3600)
    smtp = await asyncio.to_thread(open_session, path, "carol@m3.example")
    try:
        first = await asyncio.to_thread(transaction, smtp, "carol@m3.example",
                                        ["ann@m3.example"])
        assert first.mail[0] == 451
        # Raised in the same SMTP session: the next transaction sees it.
        await set_limit(policy_db, "carol@m3.example", "messages", 1, window_s=3600)
        second = await asyncio.to_thread(transaction, smtp, "carol@m3.example",
                                         ["ann@m3.example"])
        third = await asyncio.to_thread(transaction, smtp, "carol@m3.example",
                                        ["ann@m3.example"])
        assert second.accepted and third.mail[0] == 451
        await policy_db.execute("DELETE FROM limits WHERE kind = 'messages'")
        fourth = await asyncio.to_thread(transaction, smtp, "carol@m3.example",
                                         ["ann@m3.example"])
        assert fourth.accepted
    finally:
        await asyncio.to_thread(finish, smtp)


async def test_admin_block_is_permanent(postfix_host: PostfixHost, milter: MilterUnderTest,
                                        policy_db: asyncpg.Pool) -> None:
    await policy_db.execute("INSERT INTO blocks (kind, value, reason)"
                            " VALUES ('account', 'bob@m4.example', 'compromised')")
    postfix = await postfix_host.postfix("m4.example")
    attempt = await asyncio.to_thread(send_one, postfix.socket(), "bob@m4.example",
                                      ["ann@m4.example"])
    assert attempt.mail[0] == 550
    assert attempt.mail[1] == ("5.7.1 blocked by the administrator (account bob@m4.example):"
                               " compromised")
