"""SMTP Router: authenticated submission into the user's own domain's Postfix."""

from __future__ import annotations

import asyncio
import os
import signal
import smtplib
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

from mailfc.db import limits
from mailfc.fairness import Bucket
from mailfc.routers.submission import SEND_LIMITS_REFRESH_S, SubmissionRouter
from mailfc.runtime.readiness import process_alive
from tests.conftest import require_binary
from tests.routers.conftest import (
    PASSWORD,
    SUBMISSION_PORT,
    SUBMISSIONS_PORT,
    RouterHost,
    client_tls,
)


def submit(user: str, password: str, sender: str, subject: str,
           recipients: tuple[str, ...] = ("someone@remote.example",)
           ) -> dict[str, tuple[int, bytes]]:
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


# -- DATA: streamed in bounded chunks, one size limit, a lost backend answered ----------

LINE = b"x" * 998 + b"\r\n"


def body_chunks(size: int, marker: bytes) -> Iterator[bytes]:
    """A message of exactly `size` bytes (header, CRLF lines, `marker` last), made
    as it is sent: the client never holds it whole either."""
    head = b"From: bob@a.example\r\nSubject: big\r\n\r\n"
    tail = marker + b"\r\n"
    yield head
    left = size - len(head) - len(tail)
    block = LINE * 64
    while left >= len(block):
        yield block
        left -= len(block)
    lines, rest = divmod(left, len(LINE))
    yield LINE * lines
    if rest:
        yield b"y" * (rest - 2) + b"\r\n" if rest >= 2 else b"\r\n"[:rest]
    yield tail


def open_submission(user: str = "bob@a.example") -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", SUBMISSION_PORT, timeout=120)
    client.starttls(context=client_tls())
    client.login(user, PASSWORD)
    return client


def send_streamed(client: smtplib.SMTP, sender: str, recipient: str,
                  chunks: Iterable[bytes], *, after_354: Callable[[], None] | None = None
                  ) -> tuple[int, bytes]:
    """MAIL, RCPT, DATA, then the chunks as they come and the final dot: the reply."""
    assert client.mail(sender)[0] == 250
    assert client.rcpt(recipient)[0] == 250
    code, text = client.docmd("DATA")
    assert code == 354, (code, text)
    if after_354 is not None:
        after_354()
    assert client.sock is not None
    try:
        for chunk in chunks:
            client.sock.sendall(chunk)
        client.sock.sendall(b".\r\n")
    except OSError as error:
        raise AssertionError(f"the router dropped the connection: {error}") from None
    return client.getreply()


def peak_rss_reset() -> int:
    """Reset this process's peak RSS (VmHWM) and return its RSS now, in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def peak_rss() -> int:
    return _status_kib("VmHWM") * 1024


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


def queued_with(router_host: RouterHost, domain: str, marker: bytes) -> list[Path]:
    """The domain's Postfix queue files (any queue) holding `marker` near their end."""
    found = []
    spool = router_host.runtime.settings.domains_dir / domain
    for path in spool.glob("postfix-*/spool/*/**/*"):
        if not path.is_file() or path.stat().st_size < 1024:
            continue
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - 4096))
            if marker in handle.read():
                found.append(path)
    return found


async def test_ehlo_announces_the_one_size_limit_and_mail_size_over_it_gets_552(
        router_host: RouterHost) -> None:
    limit = router_host.config.messages.size_limit

    def dialogue() -> tuple[str, tuple[int, bytes], tuple[int, bytes]]:
        with open_submission() as client:
            client.ehlo()
            announced = client.esmtp_features["size"]
            over = client.docmd("MAIL", f"FROM:<bob@a.example> SIZE={limit + 1}")
            within = client.docmd("MAIL", f"FROM:<bob@a.example> SIZE={limit}")
            return announced, over, within

    announced, over, within = await asyncio.to_thread(dialogue)
    assert announced == str(limit)
    assert over[0] == 552 and b"5.3.4" in over[1] and str(limit).encode() in over[1]
    assert within[0] == 250, within


async def test_a_300_kb_line_gets_a_reply_not_a_dropped_connection(
        router_host: RouterHost) -> None:
    """In a message it is relayed (Postfix wraps it); as a command, 500 5.5.6."""
    marker = f"long-line-{uuid.uuid4()}".encode()

    def long_body_line() -> tuple[int, bytes]:
        with open_submission() as client:
            return send_streamed(client, "bob@a.example", "someone@remote.example", [
                b"From: bob@a.example\r\nSubject: long line\r\n\r\n",
                b"z" * 300_000 + b"\r\n", marker + b"\r\n"])

    code, text = await asyncio.to_thread(long_body_line)
    assert code == 250, (code, text)

    def long_command_line() -> tuple[int, bytes]:
        with open_submission() as client:
            assert client.sock is not None
            client.sock.sendall(b"NOOP " + b"n" * 300_000 + b"\r\n")
            return client.getreply()

    code, text = await asyncio.to_thread(long_command_line)
    assert code == 500 and b"5.5.6" in text, (code, text)


async def test_a_40_mb_message_is_relayed_in_bounded_memory(router_host: RouterHost) -> None:
    """40 MB through 587: the domain's Postfix takes it (its message_size_limit is the
    one size limit, not Postfix's 10 MB default) and queues it for Filter-Out; the
    router's process grows by a few MB, not by the message."""
    marker = f"end-of-forty-{uuid.uuid4()}".encode()
    size = 40 * 1024 * 1024
    rss_before = peak_rss_reset()

    def forty() -> tuple[int, bytes]:
        with open_submission() as client:
            return send_streamed(client, "bob@a.example", "someone@remote.example",
                                 body_chunks(size, marker))

    code, text = await asyncio.to_thread(forty)
    grown = peak_rss() - rss_before
    assert code == 250, (code, text)
    assert grown < 24 << 20, f"peak RSS grew by {grown >> 20} MB for a 40 MB message"
    [queued] = await asyncio.to_thread(queued_with, router_host, "a.example", marker)
    assert queued.stat().st_size > size


async def test_one_size_limit_exactly_at_it_250_over_it_552_and_the_session_goes_on(
        router_host: RouterHost) -> None:
    """A message of exactly messages.size_limit bytes is taken (by the router and by
    the domain's Postfix, whose own count includes its queue file's overhead); one
    past it gets 552 5.3.4 at the final dot, unbuffered, and the session goes on."""
    limit = router_host.config.messages.size_limit
    marker = f"too-big-{uuid.uuid4()}".encode()
    rss_before = peak_rss_reset()

    def at_over_then_small() -> list[tuple[int, bytes]]:
        with open_submission() as client:
            return [send_streamed(client, "bob@a.example", "someone@remote.example",
                                  chunks) for chunks in (
                body_chunks(limit, b"exactly-at-the-limit"),
                body_chunks(limit + (1 << 20), marker),
                [b"Subject: after the big one\r\n\r\nhello\r\n"])]

    at, big, small = await asyncio.to_thread(at_over_then_small)
    grown = peak_rss() - rss_before
    assert at[0] == 250, at
    assert big[0] == 552 and b"5.3.4" in big[1] and str(limit).encode() in big[1], big
    assert small[0] == 250, small
    assert grown < 24 << 20, f"peak RSS grew by {grown >> 20} MB for a refused message"
    # Postfix kept nothing of it.
    assert not await asyncio.to_thread(queued_with, router_host, "a.example", marker)


async def test_a_bare_lf_dot_ends_the_message_for_the_router_as_for_postfix(
        router_host: RouterHost) -> None:
    """SMTP smuggling: "\\n.\\n" ends the message for Postfix, so it does for the
    router, and what follows is a command the router checks (a forged sender: 553)."""

    def smuggle() -> tuple[tuple[int, bytes], tuple[int, bytes]]:
        with open_submission() as client:
            assert client.mail("bob@a.example")[0] == 250
            assert client.rcpt("someone@remote.example")[0] == 250
            assert client.docmd("DATA")[0] == 354
            assert client.sock is not None
            client.sock.sendall(b"Subject: smuggler\r\n\r\nhello\n.\n"
                                b"MAIL FROM:<dave@b.example>\r\n")
            first = client.getreply()
            return first, client.getreply()

    first, second = await asyncio.to_thread(smuggle)
    assert first[0] == 250, first
    assert second[0] == 553 and b"dave@b.example" in second[1], second


async def test_the_backend_lost_after_data_gives_the_client_421(
        router_host: RouterHost) -> None:
    """The domain's Postfix dies after 354: the client still sends its message and
    hears 421 4.4.2 at its final dot (not a dropped connection)."""
    instance = await router_host.runtime.ensure("b.example", "smtp")

    def kill_postfix() -> None:
        assert instance.pid
        os.kill(instance.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while process_alive(instance.pid):
            assert time.monotonic() < deadline
            time.sleep(0.01)

    def lost_after_data() -> tuple[int, bytes]:
        with open_submission("dave@b.example") as client:
            return send_streamed(client, "dave@b.example", "someone@remote.example",
                                 body_chunks(2 << 20, b"lost"), after_354=kill_postfix)

    code, text = await asyncio.to_thread(lost_after_data)
    assert code == 421 and b"4.4.2" in text and b"b.example" in text, (code, text)
    # The domain's next session gets a new Postfix.
    assert await asyncio.to_thread(submit, "dave@b.example", PASSWORD, "dave@b.example",
                                   "after the loss") == {}
