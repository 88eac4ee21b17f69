"""Sending: submission through the user's own domain Postfix, Filter-Out, SMTP-Out."""

from __future__ import annotations

import asyncio
import smtplib
import subprocess
import uuid
from pathlib import Path

import pytest

from mailfc.db import limits
from mailfc.protocols.lmtp import read_reply
from tests.conftest import require_binary
from tests.routers.conftest import client_tls
from tests.sending.conftest import PASSWORD, SUBMISSION_PORT, SendingHost


def submit(user: str, recipients: list[str], subject: str, sender: str | None = None) -> None:
    with smtplib.SMTP("127.0.0.1", SUBMISSION_PORT, timeout=60) as client:
        client.starttls(context=client_tls())
        client.login(user, PASSWORD)
        client.sendmail(sender or user, recipients,
                        f"From: {sender or user}\r\nTo: {', '.join(recipients)}\r\n"
                        f"Subject: {subject}\r\nMessage-ID: <{uuid.uuid4()}@s.example>\r\n"
                        f"\r\nhello from {user}\r\n")


async def wait_for(predicate, within: float = 60.0,  # type: ignore[no-untyped-def]
                   explain: str = "") -> None:
    deadline = asyncio.get_running_loop().time() + within
    while asyncio.get_running_loop().time() < deadline:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"condition not met in time\n{explain}")


def in_mailbox(mail_root: Path, address: str, marker: str) -> list[bytes]:
    localpart, domain = address.split("@")
    new = mail_root / domain / localpart / "Maildir" / "new"
    if not new.exists():
        return []
    return [p.read_bytes() for p in new.iterdir() if marker.encode() in p.read_bytes()]


async def test_swaks_submission_reaches_the_remote_mx_signed_and_recorded(
        sending_host: SendingHost) -> None:
    swaks = require_binary("swaks", "swaks")
    subject = f"out {uuid.uuid4()}"
    result = await asyncio.to_thread(subprocess.run, [
        swaks, "--server", "127.0.0.1", "--port", str(SUBMISSION_PORT), "--tls",
        "--auth", "PLAIN", "--auth-user", "sam@s.example", "--auth-password", PASSWORD,
        "--from", "sam@s.example", "--to", "friend@remote.example",
        "--header", f"Subject: {subject}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:]

    def arrived() -> list[bytes]:
        return [m for _, m in sending_host.mx.messages() if subject.encode() in m]

    await wait_for(arrived)
    [message] = arrived()
    assert b"DKIM-Signature:" in message and b"d=s.example" in message

    async def recorded_with_account() -> bool:
        # The milter's rows are written in batches: give the batch its moment.
        return bool(await sending_host.pool.fetchval(
            "SELECT count(*) FROM smtp_messages WHERE sender = 'sam@s.example'"
            " AND account = 'sam@s.example' AND subject_digest IS NOT NULL"))

    await wait_for(recorded_with_account, within=10)


async def test_hosted_recipient_gets_it_in_the_maildir(sending_host: SendingHost) -> None:
    subject = f"internal {uuid.uuid4()}"
    await asyncio.to_thread(submit, "sam@s.example", ["tom@t.example"], subject)
    await wait_for(lambda: in_mailbox(sending_host.config.mail_root, "tom@t.example", subject),
                   explain=sending_host.logs("s.example"), within=20)
    assert not [m for _, m in sending_host.mx.messages() if subject.encode() in m]


async def test_spoofed_sender_is_refused(sending_host: SendingHost) -> None:
    with pytest.raises(smtplib.SMTPSenderRefused) as refused:
        await asyncio.to_thread(submit, "sam@s.example", ["friend@remote.example"], "spoof",
                                "sue@s.example")
    assert refused.value.smtp_code == 553


async def test_remote_4xx_is_retried_until_delivered(sending_host: SendingHost) -> None:
    subject = f"temp {uuid.uuid4()}"
    await asyncio.to_thread(submit, "sue@s.example", ["temp-once@remote.example"], subject)
    await wait_for(lambda: [m for _, m in sending_host.mx.messages()
                            if subject.encode() in m])

    async def verdicts() -> list[str]:
        rows = await sending_host.pool.fetch(
            "SELECT verdict FROM smtp_events WHERE rule = 'smtp-out'"
            " AND detail->>'recipient' = 'temp-once@remote.example' ORDER BY at")
        return [r["verdict"] for r in rows]

    async def delivered_recorded() -> bool:
        return "delivered" in await verdicts()

    # SMTP-Out records the delivery once the MX's 250 is back: just after the MX has it.
    await wait_for(delivered_recorded)
    assert (await verdicts())[:2] == ["deferred", "delivered"]


async def test_remote_5xx_bounces_into_the_senders_mailbox(sending_host: SendingHost) -> None:
    subject = f"bounce {uuid.uuid4()}"
    await asyncio.to_thread(submit, "sue@s.example", ["reject-me@remote.example"], subject)

    def bounce() -> list[bytes]:
        return [m for m in in_mailbox(sending_host.config.mail_root, "sue@s.example", subject)
                if b"multipart/report" in m]

    await wait_for(bounce)
    assert b"reject-me@remote.example" in bounce()[0]
    assert b"5.1.1" in bounce()[0]


async def test_over_the_concurrent_send_limit_only_that_account_waits(
        sending_host: SendingHost) -> None:
    async with sending_host.pool.acquire() as db:
        await limits.set_limit(db, "sam@s.example", "concurrent_sends", 1)
    # Connecting blocks: in a thread, since the SMTP Router runs on this loop.
    holder = await asyncio.to_thread(smtplib.SMTP, "127.0.0.1", SUBMISSION_PORT, timeout=60)
    try:
        def hold() -> tuple[int, bytes]:
            holder.starttls(context=client_tls())
            holder.login("sam@s.example", PASSWORD)
            return holder.mail("sam@s.example")

        assert (await asyncio.to_thread(hold))[0] == 250  # sam's one slot is taken

        def second() -> tuple[int, bytes]:
            with smtplib.SMTP("127.0.0.1", SUBMISSION_PORT, timeout=15) as client:
                client.starttls(context=client_tls())
                client.login("sam@s.example", PASSWORD)
                return client.mail("sam@s.example")

        try:
            code, text = await asyncio.to_thread(second)
        except (smtplib.SMTPException, OSError) as error:
            raise AssertionError(sending_host.logs("s.example")) from error
        assert code == 451 and b"4.7.1" in text
        # The rest of sam's domain and other domains keep sending meanwhile.
        await asyncio.to_thread(submit, "sue@s.example", ["friend@remote.example"], "sue ok")
        await asyncio.to_thread(submit, "tom@t.example", ["friend@remote.example"], "tom ok")
    finally:
        await asyncio.to_thread(holder.close)
        async with sending_host.pool.acquire() as db:
            await limits.unset_limit(db, "sam@s.example", "concurrent_sends")


async def test_postfix_relays_only_for_sessions_the_router_vouched_for(
        sending_host: SendingHost) -> None:
    """Straight at the domain's Postfix (on the dispatcher's socket): a client address
    from outside relays only with XCLIENT LOGIN, and AUTH there always fails."""
    runtime = sending_host.platform.runtime
    assert runtime is not None
    instance = await runtime.ensure("s.example", "smtp")

    async def session(login: bool) -> list[int]:
        reader, writer = await asyncio.open_unix_connection(instance.socket())
        codes = []

        async def command(line: str) -> None:
            writer.write(line.encode() + b"\r\n")
            codes.append((await read_reply(reader)).code)

        await read_reply(reader)
        await command("EHLO router.test")
        attributes = "ADDR=192.0.2.77 NAME=[UNAVAILABLE]" + (" LOGIN=sam@s.example" if login
                                                             else "")
        await command(f"XCLIENT {attributes}")
        await command("EHLO client.test")
        await command("AUTH PLAIN AHNhbUBzLmV4YW1wbGUAeA==")
        await command("MAIL FROM:<sam@s.example>")
        await command("RCPT TO:<friend@remote.example>")
        await command("QUIT")
        writer.close()
        return codes

    vouched = await session(login=True)
    assert vouched[1] == 220 and vouched[4:6] == [250, 250]
    assert vouched[3] in (503, 535)  # no authenticating at the Postfix itself
    stranger = await session(login=False)
    assert stranger[3] == 535 and stranger[5] == 554  # relay access denied
