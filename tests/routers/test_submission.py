"""SMTP Router: authenticated submission into the user's own domain's Postfix."""

from __future__ import annotations

import asyncio
import smtplib
import subprocess
import time
import uuid

import pytest

from mailfc.db import limits
from mailfc.fairness import Bucket
from mailfc.routers.submission import SEND_LIMITS_REFRESH_S, SubmissionRouter
from tests.conftest import require_binary
from tests.routers.conftest import (
    PASSWORD,
    SUBMISSION_PORT,
    SUBMISSIONS_PORT,
    RouterHost,
    client_tls,
)


def submit(user: str, password: str, sender: str, subject: str,
           recipients: tuple[str, ...] = ("someone@remote.example",)) -> dict[str, object]:
    with smtplib.SMTP("127.0.0.1", SUBMISSION_PORT, timeout=60) as client:
        client.starttls(context=client_tls())
        client.login(user, password)
        return client.sendmail(sender, list(recipients),
                               f"From: {sender}\r\nSubject: {subject}\r\n\r\nhello\r\n")


async def test_authenticated_submission_reaches_the_domains_postfix(
        router_host: RouterHost) -> None:
    subject = f"submitted {uuid.uuid4()}"
    refused = await asyncio.to_thread(submit, "bob@a.example", PASSWORD, "bob@a.example",
                                      subject)
    assert refused == {}
    smtp = await router_host.runtime.instances("a.example", "smtp")
    assert len(smtp) == 1 and smtp[0].state == "running"
    # The domain's milter saw the authenticated user and the real client.
    for _ in range(50):
        row = await router_host.pool.fetchrow(
            "SELECT m.account, m.sender, host(s.client_ip) AS ip FROM smtp_messages m"
            " JOIN smtp_sessions s ON s.id = m.session_id WHERE m.sender = 'bob@a.example'"
            " ORDER BY m.started_at DESC LIMIT 1")
        if row is not None:
            break
        await asyncio.sleep(0.2)
    assert row is not None
    assert row["account"] == "bob@a.example"
    assert row["ip"] == "127.0.0.1"


async def test_swaks_over_implicit_tls_and_alias_sender(router_host: RouterHost) -> None:
    swaks = require_binary("swaks", "swaks")
    result = await asyncio.to_thread(subprocess.run, [
        swaks, "--server", "127.0.0.1", "--port", str(SUBMISSIONS_PORT), "--tlsc",
        "--auth", "LOGIN", "--auth-user", "bob@a.example", "--auth-password", PASSWORD,
        "--from", "info@a.example", "--to", "someone@remote.example",
        "--header", "Subject: via swaks"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:]
    assert "235 2.7.0" in result.stdout and "250 2.0.0" in result.stdout


async def test_spoofed_sender_is_refused(router_host: RouterHost) -> None:
    with pytest.raises(smtplib.SMTPSenderRefused) as refused:
        await asyncio.to_thread(submit, "bob@a.example", PASSWORD, "dave@b.example", "spoof")
    assert refused.value.smtp_code == 553 and b"5.7.1" in refused.value.smtp_error


async def test_auth_rules(router_host: RouterHost) -> None:
    def plain_auth() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", SUBMISSION_PORT, timeout=30) as client:
            client.ehlo()
            assert not client.has_extn("auth")
            return client.docmd("AUTH", "PLAIN AGJvYkBhLmV4YW1wbGUAeA==")

    code, text = await asyncio.to_thread(plain_auth)
    assert code == 538 and b"STARTTLS" in text

    def unauthenticated_mail() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", SUBMISSION_PORT, timeout=30) as client:
            client.starttls(context=client_tls())
            client.ehlo()
            return client.mail("bob@a.example")

    assert (await asyncio.to_thread(unauthenticated_mail))[0] == 530

    for user, password in (("bob@a.example", "wrong"), ("nobody@a.example", PASSWORD)):
        with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
            await asyncio.to_thread(submit, user, password, user, "x")
        assert failed.value.smtp_code == 535 and b"5.7.8" in failed.value.smtp_error


async def test_unstartable_domain_gets_451(router_host: RouterHost) -> None:
    with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
        await asyncio.to_thread(submit, "erin@broken.example", PASSWORD,
                                "erin@broken.example", "x")
    assert failed.value.smtp_code == 451 and b"4.3.0" in failed.value.smtp_error


async def test_a_domain_spaced_out_under_pressure_waits_then_gets_451_4_7_1(
        router_host: RouterHost) -> None:
    """Admission (mailfc/fairness.py) as the router applies it: a session of a
    spaced-out domain waits for its turn before its Postfix is contacted; without a
    turn in time the AUTH gets 451 4.7.1; other domains pass meanwhile."""
    router = next(s for s in router_host.platform.services if isinstance(s, SubmissionRouter))
    admission = router.admission
    saved_wait = admission.max_wait_s
    admission.max_wait_s = 0.3
    admission.buckets["a.example"] = Bucket(rate=0.01, tokens=0.0)
    try:
        with pytest.raises(smtplib.SMTPAuthenticationError) as held:
            await asyncio.to_thread(submit, "bob@a.example", PASSWORD, "bob@a.example", "x")
        assert held.value.smtp_code == 451 and b"4.7.1" in held.value.smtp_error
        assert b"a.example" in held.value.smtp_error
        admission.buckets["a.example"] = Bucket(rate=4.0, tokens=0.0)
        started = time.monotonic()
        assert await asyncio.to_thread(submit, "bob@a.example", PASSWORD, "bob@a.example",
                                       "x") == {}
        assert time.monotonic() - started >= 0.2     # waited for its token
    finally:
        admission.buckets.pop("a.example", None)
        admission.max_wait_s = saved_wait


async def test_sessions_beyond_the_domains_concurrent_sends_limit_wait_for_a_slot(
        router_host: RouterHost) -> None:
    """SESSIONS PER DOMAIN: with a.example limited to one send at once, a second
    a.example session waits at AUTH while the first is open (451 4.7.1 when none
    frees in time) and goes through once the first has ended; other domains are
    not held, and a failed login keeps no slot."""
    router = next(s for s in router_host.platform.services if isinstance(s, SubmissionRouter))
    saved_wait = router.slot_wait_s
    router.slot_wait_s = 0.5
    async with router_host.pool.acquire() as db:
        await limits.set_limit(db, "a.example", "concurrent_sends", 1)
    await asyncio.sleep(SEND_LIMITS_REFRESH_S + 0.2)

    def open_session() -> smtplib.SMTP:
        client = smtplib.SMTP("127.0.0.1", SUBMISSION_PORT, timeout=60)
        client.starttls(context=client_tls())
        client.login("bob@a.example", PASSWORD)
        return client

    try:
        first = await asyncio.to_thread(open_session)
        try:
            with pytest.raises(smtplib.SMTPAuthenticationError) as held:
                await asyncio.to_thread(submit, "carol@a.example", PASSWORD,
                                        "carol@a.example", "x")
            assert held.value.smtp_code == 451 and b"4.7.1" in held.value.smtp_error
            assert b"a.example" in held.value.smtp_error and b"limit is 1" in held.value.smtp_error
            # Another domain is not held.
            assert await asyncio.to_thread(submit, "dave@b.example", PASSWORD,
                                           "dave@b.example", "x") == {}
            # The first session still sends: its slot is its own.
            assert await asyncio.to_thread(first.sendmail, "bob@a.example",
                                           ["someone@remote.example"],
                                           "Subject: first\r\n\r\nhello\r\n") == {}
        finally:
            await asyncio.to_thread(first.quit)
        # A failed login gives its slot back at once.
        with pytest.raises(smtplib.SMTPAuthenticationError) as wrong:
            await asyncio.to_thread(submit, "carol@a.example", "wrong", "carol@a.example", "x")
        assert wrong.value.smtp_code == 535
        assert router.domain_sessions.in_use("a.example") == 0
        assert await asyncio.to_thread(submit, "carol@a.example", PASSWORD,
                                       "carol@a.example", "x") == {}
    finally:
        router.slot_wait_s = saved_wait
        async with router_host.pool.acquire() as db:
            await limits.unset_limit(db, "a.example", "concurrent_sends")
        await asyncio.sleep(SEND_LIMITS_REFRESH_S + 0.2)


async def test_client_xclient_and_xforward_are_refused_and_change_nothing(
        router_host: RouterHost) -> None:
    """A client that speaks the router's own words (XCLIENT, XFORWARD) to pose as
    another account or address gets 5xx, before and after AUTH, on 587 and 465;
    the messages it then sends are recorded with its real account and address."""
    since = await router_host.pool.fetchval("SELECT now()")
    claims = ("XCLIENT LOGIN=dave@b.example ADDR=192.0.2.66 NAME=forged.example",
              "XFORWARD ADDR=192.0.2.67 NAME=forged.example HELO=forged.example",
              "ETRN a.example")

    def pose(implicit_tls: bool) -> list[tuple[int, bytes]]:
        client: smtplib.SMTP
        if implicit_tls:
            client = smtplib.SMTP_SSL("127.0.0.1", SUBMISSIONS_PORT, timeout=60,
                                      context=client_tls())
        else:
            client = smtplib.SMTP("127.0.0.1", SUBMISSION_PORT, timeout=60)
        with client:
            replies = [client.docmd(*claim.split(" ", 1)) for claim in claims[:2]]
            if not implicit_tls:
                client.starttls(context=client_tls())
            client.login("bob@a.example", PASSWORD)
            replies += [client.docmd(*claim.split(" ", 1)) for claim in claims]
            client.sendmail("bob@a.example", ["someone@remote.example"],
                            "From: bob@a.example\r\nSubject: posing\r\n\r\nhello\r\n")
            return replies

    for implicit_tls in (False, True):
        replies = await asyncio.to_thread(pose, implicit_tls)
        assert [code for code, _ in replies] == [550, 550, 550, 550, 502], replies
    recorded = ("SELECT m.account, host(s.client_ip) AS ip FROM smtp_messages m"
                " JOIN smtp_sessions s ON s.id = m.session_id"
                " WHERE s.component = 'postfix' AND m.started_at >= $1")
    deadline = time.monotonic() + 10
    while len(rows := await router_host.pool.fetch(recorded, since)) < 2:
        assert time.monotonic() < deadline, f"recorded: {rows}"
        await asyncio.sleep(0.2)
    assert {(row["account"], row["ip"]) for row in rows} == {("bob@a.example", "127.0.0.1")}
