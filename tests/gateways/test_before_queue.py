"""Before-queue checks on port 25: SMTP-In runs the [filter_in] chain at end of data and
answers with its verdict; a refused message is never queued, so nobody gets a bounce.
And what a sender of large or odd mail gets: never a dropped connection, never the
message whole in SMTP-In's memory."""

from __future__ import annotations

import asyncio
import base64
import os
import uuid
from pathlib import Path

import asyncpg

from mailfc.gateways.filter.checks import EICAR
from tests.gateways.conftest import MILTER_PORT, Gateways, delivered, wait_for
from tests.gateways.milter import (
    REJECT_MARK,
    REJECT_REPLY,
    REPLACE_MARK,
    TEMPFAIL_MARK,
    TestMilter,
)
from tests.gateways.test_bad_input import Client, run

HOSTED_SENDER = "carol@g1.example"


def peak_kib(pid: int) -> int:
    """VmHWM: the process's peak resident memory so far."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for {pid}")


def send_data(client: Client, data: bytes, sender: str = HOSTED_SENDER,
              rcpt: str = "bob@g1.example") -> str:
    """One transaction with `data` (CRLF lines, no dot-stuffing needed), its reply."""
    client.sock.settimeout(120)     # a big message is checked before the reply
    assert client.command("EHLO client.example").startswith("250")
    assert client.command(f"MAIL FROM:<{sender}>").startswith("250")
    assert client.command(f"RCPT TO:<{rcpt}>").startswith("250")
    assert client.command("DATA").startswith("354")
    client.send(data + b".\r\n")
    return client.reply()


def mail(marker: str, body: bytes, *, headers: str = "From: carol@g1.example\r\n") -> bytes:
    return (f"{headers}To: bob@g1.example\r\nSubject: {marker}\r\n"
            f"Message-ID: <{uuid.uuid4()}@g1.example>\r\n\r\n").encode() + body


async def no_bounce_and_nothing_queued(gateways: Gateways, before: set[str],
                                       marker: str) -> None:
    assert set(gateways.queued()) <= before
    await asyncio.sleep(1.0)     # a bounce would have been delivered by now
    root = gateways.config.mail_root
    for address in ("bob@g1.example", HOSTED_SENDER):
        assert delivered(root, address, marker) == [], address


async def test_eicar_and_no_from_get_5xx_at_end_of_data_and_no_bounce(
        gateways: Gateways, cmdb: asyncpg.Pool) -> None:
    before = set(gateways.queued())
    eicar_marker, nofrom_marker = f"eicar-{uuid.uuid4()}", f"nofrom-{uuid.uuid4()}"

    def steps(c: Client) -> tuple[str, str, str]:
        infected = send_data(c, mail(eicar_marker, b"look:\r\n" + EICAR + b"\r\n"))
        no_from = send_data(c, mail(nofrom_marker, b"who am I\r\n", headers=""))
        return infected, no_from, c.command("NOOP")

    infected, no_from, noop = await run(steps)  # type: ignore[misc]
    assert infected.startswith("550 5.7.1 infected: EICAR"), infected
    assert no_from.startswith("550 5.6.0 message header rejected: no From field"), no_from
    assert noop.startswith("250")
    await no_bounce_and_nothing_queued(gateways, before, eicar_marker)
    await no_bounce_and_nothing_queued(gateways, before, nofrom_marker)
    rows = await cmdb.fetch(
        "SELECT e.rule, e.stage, m.verdict, m.queue_id FROM smtp_events e"
        " JOIN smtp_messages m ON m.id = e.message_id JOIN smtp_sessions s"
        " ON s.id = e.session_id WHERE s.component = 'smtp-in'"
        " AND e.rule IN ('filter:eicar', 'filter:headers')")
    assert {row["rule"] for row in rows} == {"filter:eicar", "filter:headers"}
    assert all(row["stage"] == "filter" and row["verdict"] == "reject"
               and row["queue_id"] is None for row in rows)


async def test_a_milter_reply_reaches_the_client(
        gateways: Gateways, test_milter: TestMilter, cmdb: asyncpg.Pool) -> None:
    before = set(gateways.queued())
    marks = {name: f"{name}-{uuid.uuid4()}" for name in
             (REJECT_MARK, TEMPFAIL_MARK, REPLACE_MARK)}

    def steps(c: Client) -> dict[str, str]:
        return {name: send_data(c, mail(marker, b"body\r\n")) for name, marker in marks.items()}

    replies = await run(steps)
    assert isinstance(replies, dict)
    assert replies[REJECT_MARK] == REJECT_REPLY
    assert replies[TEMPFAIL_MARK].startswith("451 4.7.1 temporarily refused by milter")
    assert replies[REPLACE_MARK].startswith("250 2.0.0 OK: queued as")
    root = gateways.config.mail_root
    await wait_for(lambda: len(delivered(root, "bob@g1.example", marks[REPLACE_MARK])) == 1)
    await wait_for(lambda: set(gateways.queued()) <= before)    # the accepted one left
    for name in (REJECT_MARK, TEMPFAIL_MARK):
        await no_bounce_and_nothing_queued(gateways, before, marks[name])
    copy = delivered(root, "bob@g1.example", marks[REPLACE_MARK])[0]
    # The milter's new body and header, and OpenDKIM's verdict header before it.
    assert b"replaced line 019999" in copy and b"\nbody\n" not in copy
    assert b"X-Test-Milter: replaced" in copy
    rule = f"milter:inet:127.0.0.1:{MILTER_PORT}"
    verdicts = await cmdb.fetch("SELECT verdict FROM smtp_events WHERE rule = $1"
                                " AND stage = 'filter'", rule)
    assert {row["verdict"] for row in verdicts} >= {"reject", "tempfail"}


async def test_a_300_kb_body_line_gets_a_proper_reply(gateways: Gateways) -> None:
    marker = f"long-line-{uuid.uuid4()}"
    line = b"y" * 300_000 + b"\r\n"

    def steps(c: Client) -> tuple[str, str]:
        return send_data(c, mail(marker, line)), c.command("NOOP")

    reply, noop = await run(steps)  # type: ignore[misc]
    assert reply.startswith("250 2.0.0 OK: queued as"), reply
    assert noop.startswith("250")
    root = gateways.config.mail_root
    await wait_for(lambda: len(delivered(root, "bob@g1.example", marker)) == 1)
    assert b"y" * 300_000 in delivered(root, "bob@g1.example", marker)[0]


async def test_eicar_in_a_base64_attachment_of_many_chunks(gateways: Gateways) -> None:
    before = set(gateways.queued())
    marker = f"eicar-b64-{uuid.uuid4()}"
    noise = os.urandom(3 << 20)
    attachment = noise[:2_000_003] + EICAR + noise[2_000_003:]
    body = (b"--frontier\r\nContent-Type: text/plain\r\n\r\nsee the file\r\n"
            b"--frontier\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n"
            + base64.encodebytes(attachment).replace(b"\n", b"\r\n")
            + b"--frontier--\r\n")
    headers = ("From: carol@g1.example\r\nMIME-Version: 1.0\r\n"
               "Content-Type: multipart/mixed; boundary=frontier\r\n")
    data = mail(marker, body, headers=headers)
    assert EICAR not in data and len(data) > 4 << 20
    reply = await run(lambda c: send_data(c, data))
    assert isinstance(reply, str) and reply.startswith("550 5.7.1 infected: EICAR"), reply
    await no_bounce_and_nothing_queued(gateways, before, marker)


async def test_over_the_size_limit_gets_552_and_memory_stays_flat(
        gateways: Gateways) -> None:
    assert gateways.smtp_in is not None
    pid = gateways.smtp_in.pid
    limit = gateways.config.messages.size_limit
    before_queue = set(gateways.queued())
    line = b"z" * 998 + b"\r\n"
    block = line * 1000

    def steps(c: Client) -> tuple[str, str]:
        c.sock.settimeout(120)
        assert c.command("EHLO client.example").startswith("250")
        assert c.command(f"MAIL FROM:<{HOSTED_SENDER}>").startswith("250")
        assert c.command("RCPT TO:<bob@g1.example>").startswith("250")
        assert c.command("DATA").startswith("354")
        c.send(b"From: carol@g1.example\r\nSubject: too big\r\n\r\n")
        sent = 0
        while sent <= limit + (2 << 20):
            c.send(block)
            sent += len(block)
        c.send(b".\r\n")
        return c.reply(), c.command("NOOP")

    peak_before = peak_kib(pid)
    reply, noop = await run(steps)  # type: ignore[misc]
    peak_after = peak_kib(pid)
    assert reply.startswith("552 5.3.4"), reply
    assert noop.startswith("250")
    assert peak_after - peak_before < 4096, (peak_before, peak_after)
    assert set(gateways.queued()) <= before_queue


async def test_a_20_mb_message_is_checked_and_queued_in_bounded_memory(
        gateways: Gateways, test_milter: TestMilter) -> None:
    """The chain (EICAR scan, OpenDKIM, the test milter) and the spool read it in
    chunks: SMTP-In's peak memory hardly moves."""
    assert gateways.smtp_in is not None
    pid = gateways.smtp_in.pid
    marker = f"big-{uuid.uuid4()}"
    body = base64.encodebytes(os.urandom(15 << 20)).replace(b"\n", b"\r\n")
    headers = ("From: carol@g1.example\r\nMIME-Version: 1.0\r\n"
               "Content-Transfer-Encoding: base64\r\nContent-Type: application/octet-stream\r\n")
    data = mail(marker, body, headers=headers)
    peak_before = peak_kib(pid)
    reply = await run(lambda c: send_data(c, data))
    peak_after = peak_kib(pid)
    assert isinstance(reply, str) and reply.startswith("250 2.0.0 OK: queued as"), reply
    assert peak_after - peak_before < 8192, (peak_before, peak_after)
    assert test_milter.seen[marker].body_bytes == len(body)
    assert test_milter.seen[marker].biggest_chunk <= 65535
    root = gateways.config.mail_root
    await wait_for(lambda: len(delivered(root, "bob@g1.example", marker)) == 1, within=60)
    copy = delivered(root, "bob@g1.example", marker)[0]
    assert body.replace(b"\r\n", b"\n") in copy
